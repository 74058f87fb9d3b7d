"""Evaluate a trio: held-out cross-entropy and every built-in task, per role (`lnscope eval`).

The tasks are built on held-out templates and name/year combinations (split="heldout"),
which the tiny trio's training corpus never contains.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from pydantic import BaseModel, Field

from lnscope.analysis.kinds.base import ordered
from lnscope.analysis.ln_stats import CERow, ce_table, loss
from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.progress import Progress, ensure
from lnscope.analysis.results import PAPER_ORDER, Manifest, make_manifest
from lnscope.analysis.tasks import TaskResult, build_task, evaluate_task

EVAL_TASKS: tuple[str, ...] = ("ioi", "greater_than", "induction")


class RoleEval(BaseModel):
    role: str
    cross_entropy: float | None
    tasks: dict[str, TaskResult]


class PairEval(BaseModel):
    manifest: Manifest
    split: str
    n_prompts: int
    ce_table: list[CERow] = Field(description="held-out CE: original / control / ln_free, gaps vs original")
    roles: dict[str, RoleEval]


def evaluate_trio(
    models: Mapping[str, LoadedModel],
    eval_texts: Sequence[str],
    *,
    pair: str | None = None,
    tasks: Sequence[str] = EVAL_TASKS,
    n_prompts: int = 200,
    seed: int = 0,
    split: str = "heldout",
    max_tokens: int | None = 50_000,
    progress: Progress | None = None,
) -> PairEval:
    """CE on `eval_texts` and each task's metric and accuracy, for every role, on the same prompts."""
    progress = ensure(progress)
    tokenizer = next(iter(models.values())).tokenizer
    batches = {name: build_task(name, tokenizer, n_prompts=n_prompts, seed=seed,
                                **({} if name == "induction" else {"split": split}))
               for name in tasks}
    roles: dict[str, RoleEval] = {}
    losses = {}
    for i, (role, model) in enumerate(models.items()):
        losses[role] = loss(model, eval_texts, max_tokens=max_tokens, n_bootstrap=200, seed=seed, per_token=False,
                            progress=progress.span(f"loss on {role}: ", i / len(models), (i + 0.5) / len(models)))
        progress.stage(f"tasks on {role}", (i + 0.5) / len(models))
        device = model.device
        results = {name: evaluate_task(lambda t, b=model.bridge: b(t.to(device)), batch, batch_size=32)
                   for name, batch in batches.items()}
        roles[role] = RoleEval(role=role, cross_entropy=losses[role].mean_loss, tasks=results)
    progress.stage("done", 1.0)
    options = {"tasks": list(tasks), "n_prompts": n_prompts, "split": split, "max_tokens": max_tokens}
    return PairEval(manifest=make_manifest("eval", models, pair=pair, seed=seed, options=options), split=split,
                    n_prompts=n_prompts, roles=roles,
                    ce_table=ce_table({role: losses[role] for role in ordered(list(losses), PAPER_ORDER)}))


def format_eval(result: PairEval) -> str:
    """The CE table in the paper's layout and one task table, as plain text."""
    lines = [f"held-out cross-entropy (nats/token), pair {result.manifest.pair}", f"{'model':<10} {'CE':>8} {'gap':>8}"]
    for row in result.ce_table:
        gap = "" if row.gap_vs_original is None else f"{row.gap_vs_original:+.4f}"
        lines.append(f"{row.role:<10} {row.ce:>8.4f} {gap:>8}")
    lines.append("")
    lines.append(f"tasks on {result.split} prompts (n={result.n_prompts}): metric mean / accuracy")
    header = f"{'task':<14}" + "".join(f"{role:>22}" for role in result.roles)
    lines.append(header)
    task_names = next(iter(result.roles.values())).tasks
    for name in task_names:
        cells = []
        for role_eval in result.roles.values():
            t = role_eval.tasks[name]
            if t.second_half_loss is not None:
                cells.append(f"{t.first_half_loss:.2f} -> {t.second_half_loss:.2f}")
            else:
                cells.append(f"{t.metric_mean:+.3f} / {t.accuracy:.0%}")
        lines.append(f"{name:<14}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)
