"""Checkpoints the tests build themselves: random GPT-2 trios saved in the released formats."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

TEXT = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The war lasted from the year 1732 to the year 1758.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Once upon a time, a little dog found a red ball in the garden.",
    "1 2 3 4 5 6 7 8 9 10",
]


def make_tokenizer(vocab_size: int = 320) -> GPT2TokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT * 20, trainer)
    eos = "<|endoftext|>"
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)


def random_gpt2(seed: int, n_layer: int = 2, vocab_size: int = 320) -> GPT2LMHeadModel:
    """A random GPT-2 whose LayerNorms have non-trivial weights and biases (so folding matters)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_head=4, n_embd=64, n_positions=64, vocab_size=vocab_size,
        bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():  # larger than the 0.02 init so the maths is not near-trivial
            p.mul_(5.0)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    return model.eval()


def to_released_ln_free(model: GPT2LMHeadModel, seed: int) -> GPT2LMHeadModel:
    """The released LN-free format: every LN weight x 1e6 / sigma, eps 1e12 (config too)."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, torch.nn.LayerNorm):
                sigma = 0.5 + torch.rand((), generator=gen).item()
                m.weight.mul_(1e6 / sigma)
                m.eps = 1e12
    out.config.layer_norm_epsilon = 1e12
    return out


def perturbed(model: GPT2LMHeadModel, seed: int, scale: float = 0.05) -> GPT2LMHeadModel:
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


def save(model: GPT2LMHeadModel, tokenizer: GPT2TokenizerFast, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_trio(root: Path, seed: int = 0, n_layer: int = 2) -> dict[str, Path]:
    """original (random, LN), ln_free (a perturbed copy in the released format), control (perturbed, LN)."""
    tokenizer = make_tokenizer()
    original = random_gpt2(seed, n_layer=n_layer, vocab_size=len(tokenizer))
    ln_free = to_released_ln_free(perturbed(original, seed + 1), seed + 2)
    control = perturbed(original, seed + 3)
    return {
        "original": save(original, tokenizer, root / "original"),
        "ln_free": save(ln_free, tokenizer, root / "ln_free"),
        "control": save(control, tokenizer, root / "control"),
    }
