"""The text a pair is evaluated on when the user gives none (loss, LN statistics, neurons).

- A pair whose original is a local directory with an `eval.txt` beside it (or in it) uses
  that file: documents separated by blank lines.
- The embedded `tiny` pair uses the held-out split of its own seeded corpus, drawn as the trio was built
  (its `ioi_grammar`).
- Any other pair uses a small packaged English sample (analysis/data/eval_text.txt).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from lnscope.analysis.pairs import PairSpec

PACKAGED = Path(__file__).parent / "data" / "eval_text.txt"
TINY_EVAL_DOCS = 64
TINY_EVAL_SEED = 0


def split_documents(text: str) -> list[str]:
    return [d.strip() for d in text.replace("<|endoftext|>", "\n\n").split("\n\n") if d.strip()]


@lru_cache(maxsize=32)
def _read(path: Path) -> tuple[str, ...]:
    return tuple(split_documents(path.read_text()))


def pair_eval_text(pair: PairSpec) -> list[str]:
    src = pair.original
    if src.path is not None:
        for candidate in (src.path / "eval.txt", src.path.parent / "eval.txt"):
            if candidate.is_file():
                return list(_read(candidate))
    if pair.name == "tiny":
        from lnscope.analysis.tinymodel.build import trio_ioi_grammar
        from lnscope.analysis.tinymodel.corpus import generate_documents

        return generate_documents(TINY_EVAL_DOCS, seed=TINY_EVAL_SEED, split="heldout",
                                  ioi_grammar=trio_ioi_grammar(src.path))
    return list(_read(PACKAGED))
