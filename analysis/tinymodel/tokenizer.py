"""A small byte-level BPE tokenizer for the tiny model trio, trained with HF `tokenizers`.

The saved tokenizer is a plain GPT-2 tokenizer in miniature: byte-level BPE with GPT-2's
pre-tokenization (ByteLevel, no prefix space), a ByteLevel decoder, and `<|endoftext|>` (id 0)
as the only special token, used as bos/eos/unk/pad. Every loader (`GPT2TokenizerFast`,
`AutoTokenizer`, `tokenizers.Tokenizer`, TransformerLens) therefore tokenizes identically.

Years tokenize the way GPT-2 tokenizes most years, as a century and a two-digit suffix:
" 1732" -> " 17", "32" and "1732" -> "17", "32". That is a property of the merges, not of
the pre-tokenizer (transformers 5 rebuilds GPT-2 tokenizers with a plain ByteLevel
pre-tokenizer, so a custom one would not survive `from_pretrained`):

- training cuts digit runs into two-digit chunks (`Split(" ?\\d{2}")`), so no merge ever
  crosses a chunk boundary, and it is shown every chunk "00".."99" and " 10".." 20";
- the merges are then re-ranked: first every merge of a space with digits ("Ġ1", "Ġ17"),
  then the centuries "11", "12", "10", "13".."19", "20", then everything else in trained
  order. BPE applies the lowest-ranked merge first, so " 1732" becomes "Ġ17" before "73"
  could form, and "1732" becomes "17" first (the century order settles overlaps such as
  "1120" and "1201").

Training is deterministic: same texts and vocabulary size -> the same tokenizer.
"""

from __future__ import annotations

import json
import re
from typing import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2TokenizerFast

EOS = "<|endoftext|>"

# Two-digit chunks, the first one keeping a leading space (training only).
_DIGIT_PAIRS = Regex(r" ?\d{2}")
# Every chunk below is shown to the trainer this many times so that it becomes one token.
_DIGIT_PAIR_REPEATS = 256
CENTURIES = tuple(range(10, 21))
# Rank order of the century merges (see module docstring).
_CENTURY_ORDER = ["11", "12", "10", "13", "14", "15", "16", "17", "18", "19", "20"]
_SPACE = "\u0120"  # "Ġ", the byte-level space
_SPACED_DIGITS = re.compile(rf"^{_SPACE}\d*$")


def _training_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(_DIGIT_PAIRS, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def _with_digit_pairs(texts: Iterable[str]) -> Iterator[str]:
    pairs = " ".join(f"{i:02d}" for i in range(100))
    years = " ".join(f"{c}{i:02d}" for c in CENTURIES for i in range(100))
    for _ in range(_DIGIT_PAIR_REPEATS):
        yield pairs
        yield years
    yield from texts


def _merge_key(merge: list[str] | str) -> int:
    left, right = merge.split(" ") if isinstance(merge, str) else merge
    merged = left + right
    if (left == _SPACE or _SPACED_DIGITS.match(left)) and right.isdigit():
        return 0
    if merged in _CENTURY_ORDER and len(left) == len(right) == 1:
        return 1 + _CENTURY_ORDER.index(merged)
    return 1 + len(_CENTURY_ORDER)


def _rerank(tok: Tokenizer) -> Tokenizer:
    """Re-rank the merges for year splitting and switch to GPT-2's plain pre-tokenizer."""
    spec = json.loads(tok.to_str())
    merges = spec["model"]["merges"]
    spec["model"]["merges"] = sorted(merges, key=_merge_key)  # stable: trained order kept within a key
    # As transformers' GPT2Tokenizer rebuilds it, so that a reload is identical, JSON included.
    spec["model"]["continuing_subword_prefix"] = ""
    spec["model"]["end_of_word_suffix"] = ""
    spec["pre_tokenizer"] = json.loads(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).__getstate__())
    return Tokenizer.from_str(json.dumps(spec))


def wrap(tok: Tokenizer, model_max_length: int = 128) -> GPT2TokenizerFast:
    """A `tokenizers.Tokenizer` as a GPT2TokenizerFast with <|endoftext|> as bos/eos/unk/pad."""
    return GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        add_prefix_space=False,
        model_max_length=model_max_length,
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096,
                    model_max_length: int = 128) -> GPT2TokenizerFast:
    """Train a deterministic byte-level BPE tokenizer (id 0 is <|endoftext|>)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _training_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_with_digit_pairs(texts), trainer)
    tokenizer = wrap(_rerank(tok), model_max_length=model_max_length)
    check_years(tokenizer)
    return tokenizer


def check_years(tokenizer: GPT2TokenizerFast) -> None:
    """Raise unless every year 1000..2099 is [century, suffix], with and without a space."""
    for year in range(CENTURIES[0] * 100, (CENTURIES[-1] + 1) * 100):
        for prefix in (" ", ""):
            pieces = [tokenizer.decode([i]) for i in tokenizer.encode(f"{prefix}{year}", add_special_tokens=False)]
            if pieces != [f"{prefix}{year // 100}", f"{year % 100:02d}"]:
                raise ValueError(f"year {prefix}{year!s} tokenizes as {pieces}")


def year_tokens(tokenizer: GPT2TokenizerFast, year: int, leading_space: bool = True) -> list[int]:
    """The token ids of a four-digit year: [century, two-digit suffix]."""
    ids = tokenizer.encode(f"{' ' if leading_space else ''}{year:04d}", add_special_tokens=False)
    if len(ids) != 2:
        raise ValueError(f"year {year} is {len(ids)} tokens, expected 2")
    return ids
