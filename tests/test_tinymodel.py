"""The tiny-trio pipeline: tokenizer, pretraining, and a micro end-to-end build."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from lnscope.analysis.checks import check_model
from lnscope.analysis.pairs import ModelSource
from lnscope.analysis.tinymodel.build import BARS, build_tiny, check_bars, micro_config
from lnscope.analysis.tinymodel.corpus import generate_documents
from lnscope.analysis.tinymodel.pretrain import PretrainConfig, pack_stream, pretrain
from lnscope.analysis.tinymodel.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def docs():
    return generate_documents(600, seed=3)


@pytest.fixture(scope="module")
def tokenizer(docs):
    return train_tokenizer(docs, vocab_size=1500)


def test_tokenizer_is_deterministic_and_splits_years(docs, tokenizer, tmp_path):
    again = train_tokenizer(docs, vocab_size=1500)
    assert again.get_vocab() == tokenizer.get_vocab()
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(" 1732", add_special_tokens=False)]
    assert pieces == [" 17", "32"]
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "In 1732 Mary gave the ball to John. The war lasted from 1801 to 1845."
    assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert reloaded.eos_token == "<|endoftext|>" and reloaded.eos_token_id == 0


def test_pretraining_lowers_the_loss_and_saves_a_loadable_model(docs, tokenizer, tmp_path):
    stream = [t for d in docs[:200] for t in tokenizer.encode(d, add_special_tokens=False) + [0]]
    tokens = pack_stream(stream, 32, 0)
    assert tokens.shape[1] == 32 and bool((tokens[:, 0] == 0).all())
    cfg = PretrainConfig(n_layer=2, n_head=2, n_embd=32, n_positions=32, steps=30, batch_size=8, warmup_steps=3,
                         eval_every=0, eval_sequences=8, log_every=5, lr=3e-3)
    result = pretrain(tokens, cfg, tmp_path / "m", tokenizer=tokenizer, progress=False)
    log = json.loads(result.log_path.read_text())
    losses = log["history"]["loss"]  # mean training loss over each log_every steps
    assert result.steps == 30 and result.completed and log["steps"] == 30
    assert len(losses) >= 4 and losses[-1] < losses[0]
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    assert model.config.n_layer == 2 and model.config.vocab_size >= len(tokenizer)
    assert AutoTokenizer.from_pretrained(tmp_path / "m").get_vocab() == tokenizer.get_vocab()


def test_micro_build_ships_a_trio_that_loads_exactly(tmp_path, monkeypatch):
    import lnscope.analysis.tinymodel.corpus as corpus_module

    cfg = dataclasses.replace(micro_config(), remove_ln_steps=40)
    repeat_calls, real_repeats = [], corpus_module.repeated_token_rows
    monkeypatch.setattr(corpus_module, "repeated_token_rows", lambda pool, n, context, seed, bos, span: (
        repeat_calls.append((context, span)) or real_repeats(pool, n, context, seed, bos, span=span)))
    metrics = build_tiny(tmp_path / "tiny", config=cfg, work_dir=tmp_path / "work", progress=False)
    # full rows, then each phase: the spans asked for, else 3 to 2/5 of the phase's row
    assert repeat_calls == [(64, (4, 20)), (16, (3, 6)), (16, (2, 7)), (16, (3, 6))]
    out = tmp_path / "tiny"
    for role in ("original", "ln_free", "control"):
        files = {p.name for p in (out / role).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
        assert not any(name.endswith(".pt") for name in files)  # no optimiser state is shipped
    assert json.loads((out / "ln_free" / "config.json").read_text())["layer_norm_epsilon"] == 1e12
    card = (out / "MODEL_CARD.md").read_text()
    assert "| LN-free |" in card and "held-out CE" in card and "Quality bars" in card
    assert json.loads((out / "build_metrics.json").read_text())["checks"] == metrics["checks"]
    phases = metrics["pretrain"]["curriculum"]  # the micro build runs the context curriculum too
    assert [(p["context"], p["repeat_fraction"], p["steps"], p["text"], p["repeat_span"]) for p in phases] == [
        (16, 1.0, 3, "stream", [3, 6]), (16, 0.5, 2, "stream", [2, 7]), (16, 0.5, 2, "starts", [3, 6])]
    assert metrics["pretrain"]["repeat_span"] == [4, 20] and "sequences of 4-20 distinct tokens" in card
    assert metrics["pretrain"]["decay_steps"] == 10 and "held, then cosine to 0.0001 over the last 10 steps" in card
    assert "50% of rows repeated (2-7-token sequences)" in card
    assert "| pre-training, phase 1 | 3 | 32 x 16 | context curriculum: repeated rows only" in card
    assert "each document's start" in card and "| pre-training, full rows | 13 | 8 x 64 |" in card
    assert set(metrics["eval"]) == {"original", "control", "ln_free"}
    # document-start rows and the IOI grammar reach the data and the card
    data = metrics["data"]
    assert data["start_sequences"] == round(0.1 * data["story_sequences"] / (1 - 0.1 - cfg.repeat_rows))
    assert data["train_sequences"] == data["story_sequences"] + data["start_sequences"] + data["repeat_sequences"]
    assert data["ioi_grammar"] == 0.5 and "a fraction 0.5 of them from a grammar" in card
    assert data["split_first_word"] == 0.3 and "In a seeded fraction 0.3 of the training documents the first" in card
    assert f"{data['start_sequences']:,} rows of documents' first tokens" in card
    # the shipped LN-free twin meets the foundation bars
    result = check_model(ModelSource(path=out / "ln_free"), "ln_free", device="cpu", dtype="float64")
    assert result.max_rel_logit_error < 1e-6 and result.dla_sum_rel_error < 1e-6 and result.hook_scale_hooks == 0


def test_quality_bars_are_checked_per_role():
    good = {"heldout_ce": 2.0, "ioi": {"accuracy": 0.95, "logit_diff": 3.0},
            "greater_than": {"prob_diff": 0.7}, "induction": {"ratio": 0.2}}
    bad_ln_free = {**good, "heldout_ce": 2.0 + BARS["ln_free_ce_gap_max"] + 0.01}
    checks = check_bars({"original": good, "control": good, "ln_free": bad_ln_free})
    assert not checks["all_pass"] and not checks["ln_free.ce_gap_vs_original"]["pass"]
    assert checks["original.ioi_accuracy"]["pass"]
    assert check_bars({"original": good, "control": good, "ln_free": good})["all_pass"]


def test_lr_schedule_cosine_or_held_then_decayed():
    import math

    from lnscope.analysis.tinymodel.pretrain import lr_at

    cfg = PretrainConfig(lr=2e-3, min_lr=1e-4, warmup_steps=10, steps=110)
    lrs = [lr_at(step, cfg) for step in range(cfg.steps)]
    assert lrs[:10] == pytest.approx([2e-3 * (s + 1) / 10 for s in range(10)])
    cosine = [1e-4 + 0.5 * 1.9e-3 * (1 + math.cos(math.pi * (s - 10) / 100)) for s in range(10, 110)]
    assert lrs[10:] == pytest.approx(cosine, rel=1e-12)  # the default: one cosine after the warmup
    held = dataclasses.replace(cfg, decay_steps=40)
    lrs = [lr_at(step, held) for step in range(held.steps + 1)]
    assert lrs[10:71] == pytest.approx([2e-3] * 61)  # held from the warmup to step steps - decay_steps
    assert all(a > b for a, b in zip(lrs[70:], lrs[71:])) and lrs[110] == pytest.approx(1e-4)
    assert lrs[90] == pytest.approx(1e-4 + 0.5 * 1.9e-3)  # half-way through the decay
    whole = dataclasses.replace(cfg, decay_steps=110)  # longer than the steps after the warmup: the cosine
    assert [lr_at(s, whole) for s in range(110)] == [lr_at(s, cfg) for s in range(110)]


def test_sinusoidal_position_init():
    import math

    from lnscope.analysis.tinymodel.pretrain import make_model

    cfg = PretrainConfig(n_layer=1, n_head=2, n_embd=16, n_positions=32, position_init="sinusoidal",
                         position_init_scale=0.5)
    wpe = make_model(cfg, vocab_size=50).transformer.wpe.weight.detach()
    for p, i in [(0, 0), (3, 0), (7, 5), (31, 14), (31, 15)]:
        angle = p / 10000 ** ((i - i % 2) / 16)
        expected = 0.5 * (math.sin(angle) if i % 2 == 0 else math.cos(angle))
        assert abs(wpe[p, i].item() - expected) < 1e-6
    default = make_model(dataclasses.replace(cfg, position_init="normal"), vocab_size=50).transformer.wpe.weight
    assert abs(default.std().item() - 0.02) < 0.005  # GPT-2's N(0, 0.02)
    with pytest.raises(ValueError, match="position_init"):
        make_model(dataclasses.replace(cfg, position_init="rotary"), vocab_size=50)


def test_context_curriculum_runs_its_phases_in_order(docs, tokenizer, tmp_path, monkeypatch):
    import lnscope.analysis.tinymodel.pretrain as pretrain_module

    stream = [t for d in docs[:100] for t in tokenizer.encode(d, add_special_tokens=False) + [0]]
    long_rows, rows_8, rows_16 = pack_stream(stream, 32, 0), pack_stream(stream, 8, 0), pack_stream(stream, 16, 0)
    cfg = PretrainConfig(n_layer=1, n_head=2, n_embd=16, n_positions=32, steps=8, batch_size=4, warmup_steps=1,
                         eval_every=0, log_every=1, curriculum=((8, 2), (16, 3)))
    batches, real_loss = [], pretrain_module._loss
    monkeypatch.setattr(pretrain_module, "_loss", lambda model, batch, position_ids=None: batches.append(
        batch.clone()) or real_loss(model, batch, position_ids))
    result = pretrain(long_rows, cfg, tmp_path / "m", curriculum_tokens=[rows_8, rows_16], progress=False)
    # 4 x 32 tokens per step in every phase: 16 rows of 8, then 8 rows of 16, then 4 full rows
    assert [tuple(b.shape) for b in batches] == [(16, 8)] * 2 + [(8, 16)] * 3 + [(4, 32)] * 3
    assert result.tokens_seen == 8 * 4 * 32
    for batch, rows in [(batches[0], rows_8), (batches[2], rows_16), (batches[5], long_rows)]:
        assert all(any(torch.equal(row, r) for r in rows) for row in batch)  # each phase draws from its own rows
    assert len({tuple(r.tolist()) for b in batches[:2] for r in b}) == 32  # one epoch: no row twice
    phases = json.loads(result.log_path.read_text())["data"]["curriculum"]
    assert phases == [{"context": 8, "steps": 2, "sequences": rows_8.shape[0], "batch_size": 16},
                      {"context": 16, "steps": 3, "sequences": rows_16.shape[0], "batch_size": 8}]
    with pytest.raises(ValueError, match="curriculum_tokens has 1 tensors"):
        pretrain(long_rows, cfg, tmp_path / "x", curriculum_tokens=[rows_8], progress=False)
    with pytest.raises(ValueError, match=r"curriculum_tokens\[1\] must be \[n_seq, ctx <= 16\]"):
        pretrain(long_rows, cfg, tmp_path / "x", curriculum_tokens=[rows_8, long_rows], progress=False)
    with pytest.raises(ValueError, match=r"curriculum_tokens\[0\] rows have 4 tokens"):
        pretrain(long_rows, cfg, tmp_path / "x", curriculum_tokens=[pack_stream(stream, 4, 0), rows_16],
                 progress=False)
    with pytest.raises(ValueError, match="exceed steps"):
        pretrain(long_rows, dataclasses.replace(cfg, steps=4), tmp_path / "x", curriculum_tokens=[rows_8, rows_16],
                 progress=False)
    with pytest.raises(ValueError, match="context must be in"):
        pretrain(long_rows, dataclasses.replace(cfg, curriculum=((64, 2), (16, 3))), tmp_path / "x",
                 curriculum_tokens=[rows_8, rows_16], progress=False)


def test_curriculum_option_parses():
    import argparse

    from lnscope.analysis.tinymodel.cli import parse_curriculum, parse_span

    assert parse_curriculum("32:1.0:300,32:0.5:700:starts") == ((32, 1.0, 300, "stream", None),
                                                                 (32, 0.5, 700, "starts", None))
    assert parse_curriculum("128:0.25:500:starts:20-50,64:0.5:10:3-25") == (
        (128, 0.25, 500, "starts", (20, 50)), (64, 0.5, 10, "stream", (3, 25)))
    assert parse_curriculum("none") == () == parse_curriculum("")
    assert parse_span("3-50") == (3, 50)
    for bad in ("32:1.0", "32:1.5:10", "x:0.5:10", "32:0.5:10:middles", "32:0.5:10:starts:x", "32:0.5:10:3-x",
                "32:0.5:10:3-12:starts", "32:0.5:10:starts:3-12:x", "32:0.5:10:1-12", "32:0.5:10:20-12",
                "32:0.5:10:3-16", "32:0.5:10:starts:3-1a"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_curriculum(bad)
    assert parse_curriculum("32:0.5:10:2-15") == ((32, 0.5, 10, "stream", (2, 15)),)  # the bounds at 32
    for bad in ("3", "3-", "-3", "a-b", "3-5-7", "\u00b2-3", " 3-5"):
        with pytest.raises(argparse.ArgumentTypeError, match="LO-HI"):
            parse_span(bad)


def test_repeat_pool(tokenizer):
    from lnscope.analysis.tasks.induction import word_token_pool
    from lnscope.analysis.tinymodel.build import repeat_pool

    vocab = repeat_pool(tokenizer, "vocab")
    assert tokenizer.eos_token_id not in vocab and len(vocab) == len(tokenizer) - len(set(tokenizer.all_special_ids))
    assert repeat_pool(tokenizer, "words") == word_token_pool(tokenizer)
    assert set(word_token_pool(tokenizer)) < set(vocab)
    with pytest.raises(ValueError, match="repeat_pool"):
        repeat_pool(tokenizer, "names")


def test_split_first_word_splits_only_the_opening_word_and_keeps_the_text(docs, tokenizer):
    import random

    from lnscope.analysis.tinymodel.build import split_word_ids, tokenize_docs

    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    one = "One day Mary and John went to the park, and John gave a ball to Mary."
    assert len(encode("One")) == 1  # a common opening is one token at a document's start
    split = tokenize_docs(tokenizer, [one], split_first_word=1.0, seed=0)
    pieces = len(split) - len(encode(one))  # "One"'s pieces (the stream also has <|endoftext|>)
    assert pieces >= 2 and tokenizer.decode(split[:pieces]) == "One"
    assert split[pieces:] == encode(one)[1:] + [tokenizer.eos_token_id]  # the rest is as before
    # no letters first, or a one-letter word: nothing to split
    for doc in ("1732 was a year.", "A cat sat.", ", and then"):
        assert tokenize_docs(tokenizer, [doc], split_first_word=1.0) == encode(doc) + [tokenizer.eos_token_id]
    # a seeded fraction of documents; the text is the same; 0 is the plain stream
    plain_starts, half_starts = [], []
    plain = tokenize_docs(tokenizer, docs, plain_starts)
    assert tokenize_docs(tokenizer, docs, split_first_word=0.0, seed=7) == plain
    half = tokenize_docs(tokenizer, docs, half_starts, split_first_word=0.5, seed=0)
    assert half == tokenize_docs(tokenizer, docs, split_first_word=0.5, seed=0)
    assert half != tokenize_docs(tokenizer, docs, split_first_word=0.5, seed=1)
    assert tokenizer.decode(half) == tokenizer.decode(plain)
    bounds = lambda starts, stream: list(zip(starts, [*starts[1:], len(stream)]))  # noqa: E731
    changed = [plain[a:b] != half[c:d]
               for (a, b), (c, d) in zip(bounds(plain_starts, plain), bounds(half_starts, half))]
    assert 0.3 < sum(changed) / len(docs) < 0.6  # a split can fall where the plain tokens already cut
    # split_word_ids: the word's text, in 2 or more pieces, seeded
    for seed in range(20):
        ids = split_word_ids(tokenizer, "Yesterday", random.Random(seed))
        assert tokenizer.decode(ids) == "Yesterday" and len(ids) >= 2
    assert split_word_ids(tokenizer, "Yesterday", random.Random(3)) == split_word_ids(tokenizer, "Yesterday",
                                                                                      random.Random(3))
    with pytest.raises(ValueError, match="split_first_word"):
        tokenize_docs(tokenizer, docs, split_first_word=1.5)


def test_document_start_rows():
    from lnscope.analysis.tinymodel.build import document_start_rows

    docs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    starts, stream = [], []
    for doc in docs:
        starts.append(len(stream))
        stream += doc + [0]
    rows = document_start_rows(stream, starts, context=4, bos_id=0)
    # each row: bos + the first 3 tokens from a document's start, running on into the next one
    assert rows.tolist() == [[0, 5, 6, 7], [0, 10, 11, 0], [0, 12, 13, 14]]
    assert document_start_rows(stream, starts, context=7, bos_id=0).tolist() == [
        [0, 5, 6, 7, 8, 9, 0], [0, 10, 11, 0, 12, 13, 14]]  # the last document cannot fill a row of 7


def test_sample_rows_uses_each_row_once_per_pass():
    from lnscope.analysis.tinymodel.build import sample_rows

    rows = torch.arange(10).reshape(5, 2)
    assert sample_rows(rows, 0, seed=0).shape == (0, 2)
    three = sample_rows(rows, 3, seed=0)
    assert len({tuple(r) for r in three.tolist()}) == 3  # a part of one pass: no row twice
    twelve = sample_rows(rows, 12, seed=0).tolist()
    counts = [twelve.count(r) for r in rows.tolist()]
    assert sorted(counts) == [2, 2, 2, 3, 3] and all(r in rows.tolist() for r in twelve)
    assert sorted(twelve[:5]) == rows.tolist() == sorted(twelve[5:10])
    assert torch.equal(sample_rows(rows, 12, seed=0), sample_rows(rows, 12, seed=0))
    assert not torch.equal(sample_rows(rows, 12, seed=0), sample_rows(rows, 12, seed=1))
    with pytest.raises(ValueError, match="from none"):
        sample_rows(rows[:0], 1, seed=0)


def test_build_config_is_checked_before_any_stage(tmp_path):
    from lnscope.analysis.tinymodel.build import CurriculumPhase, check_config, check_span

    cfg = micro_config()
    bad = [
        (dataclasses.replace(cfg, repeat_rows=1.0), "repeat_rows"),
        (dataclasses.replace(cfg, start_rows=-0.1), "start_rows"),
        (dataclasses.replace(cfg, repeat_rows=0.5, start_rows=0.5), "repeat_rows \\+ start_rows < 1"),
        (dataclasses.replace(cfg, ioi_grammar=1.5), "ioi_grammar"),
        (dataclasses.replace(cfg, split_first_word=-0.1), "split_first_word"),
        (dataclasses.replace(cfg, curriculum=(CurriculumPhase(128, 0.5, 2),)), "context must be in"),
        (dataclasses.replace(cfg, curriculum=(CurriculumPhase(16, 1.5, 2),)), "repeat_fraction"),
        (dataclasses.replace(cfg, curriculum=(CurriculumPhase(16, 0.5, 2, "middles"),)), "text must be one of"),
        (dataclasses.replace(cfg, curriculum=(CurriculumPhase(16, 0.5, 30),)), "exceed the pretraining steps"),
        (dataclasses.replace(cfg, curriculum=(CurriculumPhase(16, 0.5, 2, span=(3, 8)),)),
         r"curriculum phase .*: span must be LO-HI with 2 <= LO <= HI <= 7"),
        (dataclasses.replace(cfg, repeat_span=(1, 20)), "^repeat_span must be LO-HI"),
        (dataclasses.replace(cfg, repeat_span=(30, 20)), "^repeat_span must be LO-HI"),
        (dataclasses.replace(cfg, repeat_span=(4.5, 20)), "^repeat_span must be LO-HI, two whole numbers"),
        (dataclasses.replace(cfg, repeat_span=(4, 20, 30)), "^repeat_span must be LO-HI, two whole numbers"),
        (dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, decay_steps=0)), "decay_steps"),
        (dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, decay_steps=21)), "decay_steps"),
    ]
    for config, message in bad:
        with pytest.raises(ValueError, match=message):
            build_tiny(tmp_path / "out", config=config, work_dir=tmp_path / "work", progress=False)
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()  # nothing ran
    # the bounds themselves are allowed; spans come back as (LO, HI) tuples; no repeated rows, no span to check
    assert check_span([2, 7], 16, "span") == (2, 7) and check_span((31, 31), 64, "span") == (31, 31)
    phases = check_config(dataclasses.replace(cfg, curriculum=(CurriculumPhase(16, 0.5, 2, "starts", [2, 7]),)))
    assert phases == [(16, 0.5, 2, "starts", (2, 7))]
    check_config(dataclasses.replace(cfg, repeat_rows=0.0, repeat_span=(1, 2)))


def test_shipped_model_card_renders_from_its_metrics():
    from pathlib import Path

    from lnscope.analysis.tinymodel.model_card import render_model_card

    tiny = Path(__file__).resolve().parents[1] / "models" / "tiny"
    card = render_model_card(json.loads((tiny / "build_metrics.json").read_text()))
    assert (tiny / "MODEL_CARD.md").read_text().startswith(card)  # the transcoders' section follows


def test_curriculum_position_offsets(docs, tokenizer, tmp_path, monkeypatch):
    import lnscope.analysis.tinymodel.pretrain as pretrain_module

    stream = [t for d in docs[:100] for t in tokenizer.encode(d, add_special_tokens=False) + [0]]
    cfg = PretrainConfig(n_layer=1, n_head=2, n_embd=16, n_positions=32, steps=5, batch_size=4, warmup_steps=1,
                         eval_every=0, log_every=1, curriculum=((8, 3),), curriculum_position_offsets=True)
    seen, real_loss = [], pretrain_module._loss
    monkeypatch.setattr(pretrain_module, "_loss", lambda model, batch, position_ids=None: seen.append(
        (batch.shape, position_ids)) or real_loss(model, batch, position_ids))
    pretrain(pack_stream(stream, 32, 0), cfg, tmp_path / "m", curriculum_tokens=[pack_stream(stream, 8, 0)],
             progress=False)
    offsets = torch.cat([ids[:, 0] for _, ids in seen[:3]])
    for shape, ids in seen[:3]:
        assert ids.shape == shape and bool((ids - ids[:, :1] == torch.arange(8)).all())  # consecutive positions
    assert int(offsets.min()) >= 0 and int(offsets.max()) <= 32 - 8 and len(set(offsets.tolist())) > 10
    assert [ids for _, ids in seen[3:]] == [None, None]  # full rows keep positions 0..31
    # the offset rows' loss is the model's loss at those positions
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    batch = pack_stream(stream, 8, 0)[:2]
    ids = torch.tensor([[5], [20]]) + torch.arange(8)
    shifted = real_loss(model, batch, ids)
    assert not torch.allclose(shifted, real_loss(model, batch))
    logits = torch.cat([model(input_ids=batch[i : i + 1], position_ids=ids[i : i + 1]).logits for i in range(2)])
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    torch.testing.assert_close(shifted, expected)


def test_tiny_text_follows_the_corpus_the_trio_was_built_with(tmp_path):
    from lnscope.analysis.eval_text import TINY_EVAL_DOCS, TINY_EVAL_SEED, pair_eval_text
    from lnscope.analysis.pairs import ModelSource, PairSpec
    from lnscope.analysis.tinymodel.build import METRICS_FILE, trio_ioi_grammar
    from lnscope.analysis.tinymodel.corpus import generate_documents
    from lnscope.analysis.transcoders.cli import TINY_TRAIN_DOCS, training_text

    original = tmp_path / "original"
    assert trio_ioi_grammar(None) == 0.0 == trio_ioi_grammar(original)  # no metrics: the first trio's corpus
    (tmp_path / METRICS_FILE).write_text(json.dumps({"data": {"train_docs": 10}}))  # metrics without the field
    assert trio_ioi_grammar(original) == 0.0
    (tmp_path / METRICS_FILE).write_text(json.dumps({"data": {"ioi_grammar": 0.7}}))
    assert trio_ioi_grammar(original) == 0.7
    pair = PairSpec(name="tiny", original=ModelSource(path=original),
                    ln_free=ModelSource(path=tmp_path / "ln_free"))
    grammar = generate_documents(TINY_EVAL_DOCS, seed=TINY_EVAL_SEED, split="heldout", ioi_grammar=0.7)
    assert pair_eval_text(pair) == grammar != generate_documents(TINY_EVAL_DOCS, seed=TINY_EVAL_SEED, split="heldout")
    assert training_text(pair, None) == generate_documents(TINY_TRAIN_DOCS, seed=0, split="train", ioi_grammar=0.7)


def test_build_defaults_are_the_shipped_trio_s_recipe():
    """`make tiny-models` (BuildConfig's defaults) rebuilds the shipped trio: the same config but the safety stop
    and pretrain.curriculum (which the build derives from the phases)."""
    from lnscope.analysis.pairs import models_dir
    from lnscope.analysis.tinymodel.build import METRICS_FILE, BuildConfig

    shipped = json.loads((models_dir() / "tiny" / METRICS_FILE).read_text())["config"]
    ours = json.loads(json.dumps(BuildConfig().to_dict()))
    for cfg in (shipped, ours):  # the build fills pretrain.curriculum from the phases; the stop is Make's
        cfg["pretrain"].pop("curriculum")
        cfg["pretrain"].pop("time_budget_minutes")
    assert ours == shipped
