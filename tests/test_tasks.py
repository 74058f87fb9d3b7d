"""Built-in tasks: tokenizer adaptation, splits, corruptions, metrics, evaluation, registry."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lnscope.analysis.tasks import (
    BUILTIN_TASKS,
    build_task,
    describe_builtin_tasks,
    evaluate_task,
    make_custom,
    make_greater_than,
    make_induction,
    make_ioi,
    vocab,
    year_tokens,
)
from lnscope.analysis.tinymodel.corpus import generate_documents
from tests.test_corpus import DIGIT_PAIRS, train_bpe

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE trained on 2000 corpus documents, digit runs split in pairs.

    vocab_size 4096 is not reached: the corpus runs out of merges at about 2500 tokens; a
    smaller vocab_size leaves some of the rarer two-digit suffixes unmerged.
    """
    return train_bpe(generate_documents(2000, seed=7), vocab_size=4096)


def word_level(digit_pattern: str | None = DIGIT_PAIRS, drop: tuple[str, ...] = ()):
    """A word-level tokenizer over the task vocabulary, with ids we can look up exactly.

    Pre-tokenized like GPT-2 (byte-level), with digit runs split by `digit_pattern` first (none:
    every year is one token); pieces in `drop` are left out.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False)]
    if digit_pattern:
        steps.insert(0, pre_tokenizers.Split(Regex(digit_pattern), behavior="isolated"))
    pre = pre_tokenizers.Sequence(steps)
    texts = list(vocab.ioi_templates("all")) + list(vocab.year_templates("all"))
    texts += [f" {w}" for w in vocab.NAMES + vocab.PLACES + vocab.OBJECTS + vocab.YEAR_NOUNS]
    texts += [f" {c}{yy:02d}" for c in vocab.CENTURIES for yy in range(100)]
    texts += [f" {c}" for c in vocab.CENTURIES] + [f"{yy:02d}" for yy in range(100)]
    pieces = {EOT: 0}
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            if piece not in pieces and piece.strip("Ġ") not in drop:
                pieces[piece] = len(pieces)
    tok = Tokenizer(models.WordLevel(vocab=pieces, unk_token=EOT))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)


def tid(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text)
    assert len(ids) == 1, text
    return ids[0]


# --- IOI ---------------------------------------------------------------------------------------


def test_ioi_keeps_only_single_token_words():
    tok = word_level(drop=("Mary", "John", "store"))
    batch = make_ioi(tok, 60, seed=0, split="all")
    used = set(batch.io_names) | set(batch.s_names)
    assert "Mary" not in used and "John" not in used
    assert not any("store" in p for p in batch.prompts)
    with pytest.raises(ValueError, match=r"names.*' Alice'"):
        make_ioi(word_level(drop=vocab.NAMES[:-3]), 4)


def test_ioi_shapes_abc_and_answers(bpe):
    batch = make_ioi(bpe, 40, seed=1)
    assert batch.clean_tokens.shape == batch.corrupt_tokens.shape
    assert batch.clean_tokens.dtype == torch.long and batch.end_pos.shape == (40,)
    assert (batch.clean_tokens[:, 0] == bpe.bos_token_id).all()
    assert batch.orders.count("ABBA") == batch.orders.count("BABA") == 20
    for i in range(len(batch)):
        io, s = batch.io_names[i], batch.s_names[i]
        assert batch.answer_tokens[i].tolist() == [tid(bpe, " " + io), tid(bpe, " " + s)]
        positions = batch.name_positions[i].tolist()
        clean_names = batch.clean_tokens[i, positions].tolist()
        assert clean_names == [tid(bpe, " " + io), tid(bpe, " " + s), tid(bpe, " " + s)]
        corrupt_names = batch.corrupt_tokens[i, positions].tolist()
        assert len(set(corrupt_names)) == 3
        assert not set(corrupt_names) & set(batch.answer_tokens[i].tolist())
        end = int(batch.end_pos[i])
        assert batch.prompts[i].endswith(bpe.decode(batch.clean_tokens[i, end]))
        assert (batch.clean_tokens[i, end + 1 :] == bpe.eos_token_id).all()  # right padding


def test_ioi_swap_s_repeats_the_indirect_object(bpe):
    batch = make_ioi(bpe, 10, seed=2, corruption="swap_s")
    for i in range(len(batch)):
        io_pos, s1_pos, s2_pos = batch.name_positions[i].tolist()
        assert batch.corrupt_tokens[i, s2_pos] == batch.answer_tokens[i, 0]
        differs = (batch.clean_tokens[i] != batch.corrupt_tokens[i]).nonzero().flatten().tolist()
        assert differs == [s2_pos]
    with pytest.raises(ValueError, match="corruption"):
        make_ioi(bpe, 2, corruption="xyz")


def test_ioi_splits_are_disjoint(bpe):
    assert not set(vocab.TRAIN_IOI_TEMPLATES) & set(vocab.HELDOUT_IOI_TEMPLATES)
    for template in vocab.ioi_templates("all"):
        assert not template.startswith("{"), template  # every name follows a space
    for split in ("heldout", "train"):
        batch = make_ioi(bpe, 80, seed=3, split=split)
        assert set(batch.templates) <= set(vocab.ioi_templates(split))
        for io, s in zip(batch.io_names, batch.s_names):
            assert vocab.is_heldout_pair(io, s) == (split == "heldout")
    heldout = make_ioi(bpe, 80, seed=3, split="heldout")
    train_res = [vocab.template_regex(t) for t in vocab.TRAIN_IOI_INTROS + vocab.TRAIN_IOI_ACTIONS]
    for prompt in heldout.prompts:
        assert not any(r.search(prompt) for r in train_res), prompt
    with pytest.raises(ValueError, match="split"):
        make_ioi(bpe, 2, split="test")


def test_ioi_metric_is_the_logit_difference(bpe):
    batch = make_ioi(bpe, 6, seed=4)
    logits = torch.randn(6, batch.clean_tokens.shape[1], len(bpe))
    expected = []
    for i in range(6):
        io, s = batch.answer_tokens[i].tolist()
        end = int(batch.end_pos[i])
        logits[i, end, io] = 5.0 if i % 2 == 0 else -5.0
        expected.append(logits[i, end, io] - logits[i, end, s])
    assert torch.allclose(batch.metric(logits), torch.stack(expected))
    assert batch.accuracy(logits) == pytest.approx(0.5)


# --- greater-than ------------------------------------------------------------------------------


def test_greater_than_on_trained_bpe(bpe):
    batch = make_greater_than(bpe, 30, seed=0)
    century = tid(bpe, " 17")
    assert batch.clean_tokens.shape == batch.corrupt_tokens.shape
    assert batch.suffix_token_ids.tolist() == [tid(bpe, f"{yy:02d}") for yy in range(100)]
    for i in range(len(batch)):
        end = int(batch.end_pos[i])
        assert bpe.decode(batch.clean_tokens[i, : end + 1]).endswith(batch.prompts[i])
        assert batch.prompts[i].endswith(f" {int(batch.century[i])}")
        differs = (batch.clean_tokens[i] != batch.corrupt_tokens[i]).nonzero().flatten().tolist()
        assert len(differs) == 1
        yy = int(batch.start_suffix[i])
        assert 2 <= yy <= 98
        assert batch.clean_tokens[i, differs[0]] == batch.suffix_token_ids[yy]
        assert batch.corrupt_tokens[i, differs[0]] == batch.suffix_token_ids[1]
    assert century in batch.clean_tokens


def test_greater_than_splits(bpe):
    for split in ("heldout", "train"):
        batch = make_greater_than(bpe, 60, seed=1, split=split)
        assert set(batch.templates) <= set(vocab.year_templates(split))
        for c, yy in zip(batch.century.tolist(), batch.start_suffix.tolist()):
            assert vocab.is_heldout_year(c, yy) == (split == "heldout")
    assert not set(vocab.TRAIN_YEAR_TEMPLATES) & set(vocab.HELDOUT_YEAR_TEMPLATES)


def test_greater_than_metric_on_hand_made_distributions():
    tok = word_level()
    batch = make_greater_than(tok, 4, seed=0)
    batch.start_suffix[:] = torch.tensor([49, 49, 98, 2])
    logits = torch.full((4, batch.clean_tokens.shape[1], len(tok)), -1e4)
    suffix = batch.suffix_token_ids
    logits[0, batch.end_pos[0], suffix[99]] = 0.0  # all mass on "99"
    logits[1, batch.end_pos[1], suffix[1]] = 0.0  # all mass on "01"
    logits[2, batch.end_pos[2], suffix] = 0.0  # uniform: 1 greater (99) of 100
    logits[3, batch.end_pos[3], suffix] = 0.0  # uniform: 97 greater of 100
    metric = batch.metric(logits)
    assert torch.allclose(metric, torch.tensor([1.0, -1.0, -0.98, 0.94]), atol=1e-5)
    assert batch.accuracy(logits) == pytest.approx(0.5)


def test_greater_than_adapts_to_a_separate_space_token():
    """Digits split without their space: ' 1732' -> 'Ġ' '17' '32'; the century is 2 tokens."""
    tok = word_level(digit_pattern=r"\d{2}")
    years = year_tokens(tok)
    assert len(years.century_ids[17]) == 2
    batch = make_greater_than(tok, 5, seed=0)
    for i in range(5):
        end = int(batch.end_pos[i])
        assert batch.clean_tokens[i, end - 1 : end + 1].tolist() == years.century_ids[int(batch.century[i])]


def test_greater_than_rejects_tokenizers_that_merge_years():
    whole_years = word_level(digit_pattern=None)  # " 1732" is one token
    assert len(whole_years.encode(" 1732")) == 1
    with pytest.raises(ValueError, match=r"no heldout start year .*\['Ġ1732'\]"):
        make_greater_than(whole_years, 4)
    with pytest.raises(ValueError, match=r"'00'..'99'.*: 32 \("):
        make_greater_than(word_level(drop=("32",)), 4)


# --- induction ---------------------------------------------------------------------------------


def test_induction_from_tokenizer(bpe):
    batch = make_induction(bpe, n_prompts=5, half_len=8, seed=0)
    assert batch.clean_tokens.shape == (5, 17)
    first, second = batch.clean_tokens[:, 1:9], batch.clean_tokens[:, 9:]
    assert torch.equal(first, second)
    assert not torch.equal(batch.corrupt_tokens[:, 1:9], batch.corrupt_tokens[:, 9:])
    assert batch.corrupt_tokens.shape == batch.clean_tokens.shape
    pieces = bpe.convert_ids_to_tokens(first.flatten().tolist())
    assert all(p.startswith("Ġ") and p[1:].isalpha() for p in pieces)
    assert bpe.bos_token_id not in batch.clean_tokens[:, 1:]


def test_induction_half_losses_on_hand_made_logits():
    vocab_size, half = 50, 6
    batch = make_induction(vocab_size, n_prompts=3, half_len=half, seed=1, bos_token_id=0)
    assert batch.clean_tokens.shape == (3, 1 + 2 * half)
    logits = torch.zeros(3, 1 + 2 * half, vocab_size)  # uniform: loss log(50) everywhere
    tokens = batch.clean_tokens
    for t in range(2 + half, 1 + 2 * half):  # perfect predictions of the second copy's r[1:]
        logits[torch.arange(3), t - 1, tokens[:, t]] = 100.0
    first, second = batch.half_losses(logits)
    assert torch.allclose(first, torch.full((3,), math.log(vocab_size)))
    assert torch.allclose(second, torch.zeros(3), atol=1e-4)
    assert torch.allclose(batch.metric(logits), second)
    assert batch.accuracy(logits) == 1.0
    assert batch.higher_is_better is False
    with pytest.raises(ValueError, match="bos_token_id"):
        make_induction(vocab_size, 2, half, seed=0)


# --- custom ------------------------------------------------------------------------------------


def test_custom_pairs_and_validation(bpe):
    pair = {
        "clean": "When Mary and John went to the store, John gave a drink to",
        "corrupt": "When Mary and John went to the store, Mary gave a drink to",
        "correct": " Mary",
        "wrong": " John",
    }
    batch = make_custom(bpe, [pair, pair])
    assert batch.answer_tokens[0].tolist() == [tid(bpe, " Mary"), tid(bpe, " John")]
    logits = torch.zeros(2, batch.clean_tokens.shape[1], len(bpe))
    logits[:, :, tid(bpe, " Mary")] = 2.0
    assert batch.metric(logits).tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match=r"pair 2: 'correct'"):
        make_custom(bpe, [pair, {**pair, "correct": " Mary and"}])
    with pytest.raises(ValueError, match=r"pair 1: 'clean' and 'corrupt'"):
        make_custom(bpe, [{**pair, "corrupt": "When Mary went to the store, Mary gave a drink to"}])
    with pytest.raises(ValueError, match=r"pair 1: missing field 'wrong'"):
        make_custom(bpe, [{k: v for k, v in pair.items() if k != "wrong"}])
    with pytest.raises(ValueError, match="at least one pair"):
        make_custom(bpe, [])


# --- evaluation, gradients, registry -----------------------------------------------------------


def perfect_ioi_logits(name_ids: set[int], vocab_size: int):
    """A fake model: at every position, logit 1 on each name seen exactly once so far."""

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*tokens.shape, vocab_size)
        for b in range(tokens.shape[0]):
            counts: dict[int, int] = {}
            for p, t in enumerate(tokens[b].tolist()):
                if t in name_ids:
                    counts[t] = counts.get(t, 0) + 1
                for name, c in counts.items():
                    out[b, p, name] = 1.0 if c == 1 else 0.0
        return out

    return logits_fn


def perfect_induction_logits(vocab_size: int):
    """A fake induction model: predicts the token that followed the last earlier occurrence."""

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*tokens.shape, vocab_size)
        for b in range(tokens.shape[0]):
            seq = tokens[b].tolist()
            for p in range(len(seq)):
                earlier = [q for q in range(p) if seq[q] == seq[p]]
                if earlier:
                    out[b, p, seq[earlier[-1] + 1]] = 50.0
        return out

    return logits_fn


def test_evaluate_task_with_fake_models(bpe):
    batch = make_ioi(bpe, 10, seed=5)
    names = {tid(bpe, " " + n) for n in vocab.NAMES}
    result = evaluate_task(perfect_ioi_logits(names, len(bpe)), batch, batch_size=3)
    assert result.task == "ioi" and result.n == 10
    assert result.metric_mean == pytest.approx(1.0) and result.metric_std == pytest.approx(0.0)
    assert result.accuracy == 1.0 and result.first_half_loss is None
    corrupt = evaluate_task(perfect_ioi_logits(names, len(bpe)), batch, batch_size=4, corrupt=True)
    assert corrupt.metric_mean == pytest.approx(0.0)  # ABC: neither IO nor S is in the prompt
    json.loads(result.model_dump_json())

    induction = make_induction(100, n_prompts=4, half_len=5, seed=0, bos_token_id=0)
    res = evaluate_task(perfect_induction_logits(100), induction, batch_size=3)
    assert res.accuracy == 1.0 and res.second_half_loss == pytest.approx(0.0, abs=1e-3)
    assert res.first_half_loss == pytest.approx(math.log(100), rel=1e-4)
    assert res.metric_mean == pytest.approx(res.second_half_loss)


def test_metrics_are_differentiable(bpe):
    batches = [
        make_ioi(bpe, 3, seed=0),
        make_greater_than(bpe, 3, seed=0),
        make_induction(bpe, 3, half_len=4, seed=0),
        make_custom(bpe, [{"clean": "The cat", "corrupt": "The dog", "correct": " is", "wrong": " was"}]),
    ]
    for batch in batches:
        logits = torch.randn(len(batch), batch.clean_tokens.shape[1], len(bpe), requires_grad=True)
        batch.metric(logits).sum().backward()
        assert logits.grad is not None and logits.grad.abs().sum() > 0, batch.name


def test_subset_to_and_describe(bpe):
    batch = make_greater_than(bpe, 7, seed=0)
    part = batch.subset(slice(2, 5))
    assert len(part) == 3 and part.prompts == batch.prompts[2:5]
    assert torch.equal(part.start_suffix, batch.start_suffix[2:5])
    assert torch.equal(part.suffix_token_ids, batch.suffix_token_ids)
    moved = batch.to("cpu")
    assert torch.equal(moved.clean_tokens, batch.clean_tokens)
    for b in (batch, make_ioi(bpe, 4), make_induction(bpe, 2, 4), part):
        described = json.loads(json.dumps(b.describe()))
        assert described["n_prompts"] == len(b) and described["examples"]


def test_builtin_task_registry(bpe):
    described = json.loads(json.dumps(describe_builtin_tasks()))
    assert [t["name"] for t in described] == ["ioi", "greater_than", "induction", "custom"]
    ioi = {p["name"]: p for p in described[0]["params"]}
    assert ioi["split"]["default"] == "heldout" and ioi["split"]["choices"] == ["train", "heldout", "all"]
    assert ioi["corruption"]["choices"] == ["abc", "swap_s"]
    custom = {p["name"]: p for p in described[3]["params"]}
    assert custom["pairs"]["required"] is True
    assert set(BUILTIN_TASKS) == {"ioi", "greater_than", "induction", "custom"}
    assert build_task("ioi", bpe, n_prompts=4, split="train").split == "train"
    with pytest.raises(ValueError, match="unknown task"):
        build_task("sva", bpe)
    with pytest.raises(ValueError, match="no parameter"):
        build_task("ioi", bpe, n=3)
