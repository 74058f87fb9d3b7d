"""The synthetic corpus: deterministic, never leaks held-out task material, teaches the skills."""

from __future__ import annotations

import hashlib
import itertools
import re
import time

import pytest
import torch

from lnscope.analysis.tasks import vocab
from lnscope.analysis.tinymodel.corpus import (
    REPEAT_ROW_SPAN,
    _Story,
    generate_documents,
    ioi_grammar_template,
    iter_documents,
    join_documents,
    repeated_token_rows,
)

N_DOCS = 3000
DIGIT_PAIRS = r" ?\d{2}"  # the pre-tokenizer split recommended for the tiny model's tokenizer
NAME_RE = re.compile(r"\b(" + "|".join(vocab.NAMES) + r")\b")
YEAR_RE = re.compile(r"\d+")


def train_bpe(docs: list[str], vocab_size: int, digit_pairs: bool = True):
    """A GPT-2 style byte-level BPE trained on `docs`, optionally splitting digit runs in pairs."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False)]
    if digit_pairs:
        steps.insert(0, pre_tokenizers.Split(Regex(DIGIT_PAIRS), behavior="isolated"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return generate_documents(N_DOCS, seed=0)


def _sentences(doc: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+", doc)


def test_deterministic_and_seeded():
    a = generate_documents(40, seed=1)
    assert a == generate_documents(40, seed=1)
    assert a != generate_documents(40, seed=2)
    assert a != generate_documents(40, seed=1, split="heldout")
    assert a[:10] == list(iter_documents(10, seed=1))
    assert len(generate_documents(0, seed=1)) == 0
    with pytest.raises(ValueError, match="split"):
        generate_documents(1, seed=1, split="test")


def test_heldout_split_is_a_disjoint_stream():
    train = set(generate_documents(300, seed=0))
    heldout = generate_documents(300, seed=0, split="heldout")
    assert not train & set(heldout)


def test_heldout_ioi_and_year_templates_never_appear(docs):
    text = "\n".join(docs)
    clauses = vocab.HELDOUT_IOI_INTROS + vocab.HELDOUT_IOI_ACTIONS + vocab.HELDOUT_YEAR_TEMPLATES
    for clause in clauses:
        assert not vocab.template_regex(clause).search(text), clause
    # the training templates do occur, and IOI sentences are in most documents
    train_res = [vocab.template_regex(t) for t in vocab.TRAIN_IOI_ACTIONS]
    with_ioi = sum(any(r.search(d) for r in train_res) for d in docs)
    assert with_ioi / len(docs) > 0.7


def test_ioi_grammar_varies_templates_and_never_renders_a_heldout_clause():
    import random

    rng = random.Random(0)
    templates = [ioi_grammar_template(rng) for _ in range(3000)]
    assert len(set(templates)) > 2000  # far beyond the 196 fixed training templates
    heldout = [vocab.template_regex(c) for c in vocab.HELDOUT_IOI_INTROS + vocab.HELDOUT_IOI_ACTIONS]
    for template in templates:
        assert template.endswith(" to") and not template.startswith("{"), template
        assert not re.search(r", [A-Z]", template), template  # no sentence after a subordinate clause
        assert [template.count("{" + slot + "}") for slot in ("N1", "N2", "S2")] == [1, 1, 1], template
        assert template.index("{S2}") > max(template.index("{N1}"), template.index("{N2}")), template
        text = template.format(N1="Mary", N2="John", S2="John", PLACE="store", OBJECT="ball")
        assert not any(r.search(text) for r in heldout), template
    grammar_docs = generate_documents(600, seed=0, ioi_grammar=1.0)
    assert grammar_docs != generate_documents(600, seed=0)
    # the corpus is pinned (digest of its documents at 0): a change to it changes what `make tiny-models` builds,
    # so it lands with a rebuilt trio (last: the story sentences that give held-out clauses' words more contexts)
    plain = "\x00".join(generate_documents(50, seed=0, ioi_grammar=0.0)).encode()
    assert hashlib.sha256(plain).hexdigest() == "24fc1cc9a78506ae3ee5f31dc7d84c54e5e97d98061016c945e631c3dfca6e47"
    text = "\n".join(grammar_docs)
    for clause in vocab.HELDOUT_IOI_INTROS + vocab.HELDOUT_IOI_ACTIONS:
        assert not vocab.template_regex(clause).search(text), clause
    with pytest.raises(ValueError, match="ioi_grammar"):
        generate_documents(1, seed=0, ioi_grammar=1.5)


@pytest.mark.parametrize("ioi_grammar", [0.0, 1.0])
def test_every_ioi_sentence_ends_with_the_indirect_object(ioi_grammar):
    import random

    rng = random.Random(1)
    orders = {"ABBA": 0, "BABA": 0}
    for i in range(400):
        if i % 4 == 0:  # a story's sentences sometimes bring in new characters; a story has a few
            story = _Story(rng, ioi_grammar)
        names = NAME_RE.findall(story.ioi_sentence())
        n1, n2, s2, io = names[:4]  # an ending may name IO again
        assert s2 in (n1, n2) and {n1, n2} == {s2, io} and set(names[4:]) <= {io}, names
        orders["ABBA" if io == n1 else "BABA"] += 1
    assert min(orders.values()) > 0.35 * 400


def test_ioi_sentences_answer_the_indirect_object_in_both_orders(docs):
    pattern = re.compile(r"When (\w+) and (\w+) went to the \w+, (\w+) [a-z ]+ to (\w+)")
    orders = {"ABBA": 0, "BABA": 0}
    for doc in docs:
        for n1, n2, s2, io in pattern.findall(doc):
            assert {s2, io} == {n1, n2} and s2 != io, (n1, n2, s2, io)
            orders["ABBA" if io == n1 else "BABA"] += 1
    assert min(orders.values()) > 0.3 * sum(orders.values()) > 10


def test_heldout_template_words_are_trained(docs):
    """Held-out surface forms are new, but each of their words occurs in training text."""
    words = set(re.findall(r"[A-Za-z]+", "\n".join(docs)))
    for template in vocab.HELDOUT_IOI_TEMPLATES + vocab.HELDOUT_YEAR_TEMPLATES:
        text = re.sub(r"\{\w+\}", " ", template)
        assert set(re.findall(r"[A-Za-z]+", text)) <= words, template


def test_heldout_name_pairs_never_cooccur(docs):
    for doc in docs:
        names = set(NAME_RE.findall(doc))
        for a, b in itertools.combinations(sorted(names), 2):
            assert not vocab.is_heldout_pair(a, b), (a, b, doc)


def test_every_name_occurs(docs):
    seen = set(NAME_RE.findall("\n".join(docs)))
    assert seen == set(vocab.NAMES)


def test_year_spans_increase_within_a_century_and_skip_heldout_starts(docs):
    n_spans = 0
    for doc in docs:
        for sentence in _sentences(doc):
            numbers = YEAR_RE.findall(sentence)
            if not numbers:
                continue
            assert len(numbers) == 2 and all(len(n) == 4 for n in numbers), sentence
            start, end = int(numbers[0]), int(numbers[1])
            assert start // 100 == end // 100 and end > start, sentence
            assert not vocab.is_heldout_year(start // 100, start % 100), sentence
            assert re.search(r" \d{4}", sentence), sentence  # years follow a space
            n_spans += 1
    assert n_spans > 0.5 * len(docs)


def test_repeats_and_facts_and_lengths(docs):
    assert sum("said them again" in d or "again:" in d for d in docs) > 0.1 * len(docs)
    assert any("The capital of France is Paris." in d for d in docs)
    words = [len(d.split()) for d in docs]
    assert 70 <= sum(words) / len(words) <= 160
    assert sum(20 <= w <= 260 for w in words) == len(words)
    assert "<|endoftext|>" in join_documents(docs[:2])


def test_speed():
    start = time.perf_counter()
    generate_documents(2000, seed=3)
    # about 0.2 ms a document here: 200k documents in well under a minute
    assert time.perf_counter() - start < 3.0


def test_bpe_learns_century_and_suffix_pieces_with_digit_pairs(docs):
    tok = train_bpe(docs[:2000], vocab_size=4096)  # stops at ~2500: every merge is learned
    assert len(tok) < 3000
    assert tok.convert_ids_to_tokens(tok.encode(" 1732")) == ["Ġ17", "32"]
    for yy in range(100):
        assert len(tok.encode(f"{yy:02d}")) == 1, yy
    for century in vocab.CENTURIES:
        assert len(tok.encode(f" {century}")) == 1


def test_plain_byte_level_bpe_merges_whole_years(docs):
    """Why the digit-pair split is needed: without it BPE learns whole years as tokens once the
    corpus's words are merged (the corpus has fewer than 4096 tokens' worth of words)."""
    tok = train_bpe(docs[:2000], vocab_size=4096, digit_pairs=False)
    whole = sum(len(tok.encode(f" 17{yy:02d}")) == 1 for yy in range(100))
    assert whole > 50


def test_repeated_token_rows_say_each_sequence_again():
    pool = list(range(100, 400))
    rows = repeated_token_rows(pool, n_rows=50, context=128, seed=0, bos_id=0)
    assert rows.shape == (50, 128) and rows.dtype == torch.long
    assert torch.equal(rows, repeated_token_rows(pool, n_rows=50, context=128, seed=0, bos_id=0))
    assert not torch.equal(rows, repeated_token_rows(pool, n_rows=50, context=128, seed=1, bos_id=0))
    assert (rows[:, 0] == 0).all() and set(rows[:, 1:].unique().tolist()) <= set(pool)
    # walk each row: a run of distinct tokens, then the same run again (sometimes a third time)
    lo, hi = REPEAT_ROW_SPAN
    copies = []
    for row in rows.tolist():
        i = 1
        while True:
            j = i + 1
            while j < len(row) and row[j] not in row[i:j]:
                j += 1
            seq = row[i:j]
            n = 1
            while row[i + n * len(seq): i + (n + 1) * len(seq)] == seq:
                n += 1
            tail = row[i + n * len(seq):]
            if not tail:  # the cut at `context` may fall anywhere, even inside the first copy
                break
            if tail == seq[: len(tail)] and n < 3:  # cut inside a copy
                break
            assert lo <= len(seq) <= hi and n in (2, 3), (seq, n)
            copies.append(n)
            i += n * len(seq)
    assert len(copies) > 100 and 0.05 < copies.count(3) / len(copies) < 0.4
    with pytest.raises(ValueError, match="distinct tokens"):
        repeated_token_rows(list(range(10)), n_rows=1, context=64, seed=0, bos_id=0)
