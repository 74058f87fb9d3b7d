"""Run a task on a model and describe the built-in tasks.

`logits_fn(tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]` hides the model:
`lambda t: hf_model(t).logits` or `lambda t: bridge(t)`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from pydantic import BaseModel
from torch import Tensor

from lnscope.analysis.tasks.base import TaskBatch
from lnscope.analysis.tasks.custom import make_custom
from lnscope.analysis.tasks.greater_than import make_greater_than
from lnscope.analysis.tasks.induction import InductionBatch, make_induction
from lnscope.analysis.tasks.ioi import CORRUPTIONS, make_ioi
from lnscope.analysis.tasks.vocab import SPLITS

LogitsFn = Callable[[Int[Tensor, "batch pos"]], Float[Tensor, "batch pos vocab"]]


class TaskResult(BaseModel):
    """Metric of a task over its prompts (mean, sample std) and accuracy."""

    task: str
    n: int
    metric_mean: float
    metric_std: float
    accuracy: float
    metric_description: str
    higher_is_better: bool
    corrupt: bool = False  # evaluated on the corrupt prompts
    first_half_loss: float | None = None  # induction only
    second_half_loss: float | None = None  # induction only
    per_prompt_metric: list[float]


@torch.no_grad()
def evaluate_task(
    logits_fn: LogitsFn, batch: TaskBatch, batch_size: int = 64, corrupt: bool = False
) -> TaskResult:
    """The task's metric and accuracy, computed `batch_size` prompts at a time."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    metrics, correct, first, second = [], [], [], []
    for start in range(0, len(batch), batch_size):
        part = batch.subset(slice(start, start + batch_size))
        logits = logits_fn(part.corrupt_tokens if corrupt else part.clean_tokens)
        part = part.to(logits.device)
        if corrupt:  # the metric reads targets from clean_tokens (induction)
            part = _as_corrupt(part)
        metrics.append(part.metric(logits).float().cpu())
        correct.append(part.per_prompt_accuracy(logits).float().cpu())
        if isinstance(part, InductionBatch):
            a, b = part.half_losses(logits)
            first.append(a.cpu())
            second.append(b.cpu())
    metric = torch.cat(metrics)
    std = float(metric.std().item()) if len(metric) > 1 else 0.0
    return TaskResult(
        task=batch.name,
        n=len(metric),
        metric_mean=float(metric.mean().item()),
        metric_std=0.0 if math.isnan(std) else std,
        accuracy=float(torch.cat(correct).mean().item()),
        metric_description=batch.metric_description,
        higher_is_better=batch.higher_is_better,
        corrupt=corrupt,
        first_half_loss=float(torch.cat(first).mean().item()) if first else None,
        second_half_loss=float(torch.cat(second).mean().item()) if second else None,
        per_prompt_metric=metric.tolist(),
    )


def _as_corrupt(batch: TaskBatch) -> TaskBatch:
    """The batch with its corrupt prompts in the clean slots."""
    return dataclasses.replace(
        batch,
        clean_tokens=batch.corrupt_tokens,
        prompts=batch.corrupt_prompts,
    )


# --- registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: its builder, what it measures and what its parameters mean."""

    name: str
    builder: Callable[..., TaskBatch]
    summary: str
    metric: str
    higher_is_better: bool
    params: dict[str, str]  # parameter -> description (the first, the tokenizer, is implied)
    choices: dict[str, tuple[str, ...]]

    def describe(self) -> dict[str, Any]:
        """JSON-able: name, summary, metric and each parameter's type, default and meaning."""
        signature = inspect.signature(self.builder)
        params = []
        for name, description in self.params.items():
            p = signature.parameters[name]
            required = p.default is inspect.Parameter.empty
            params.append(
                {
                    "name": name,
                    "type": _annotation(p.annotation),
                    "required": required,
                    "default": None if required else p.default,
                    "description": description,
                    "choices": list(self.choices[name]) if name in self.choices else None,
                }
            )
        return {
            "name": self.name,
            "summary": self.summary,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "params": params,
        }


def _annotation(annotation: Any) -> str:
    if isinstance(annotation, str):  # postponed annotations (from __future__ import annotations)
        return annotation
    return getattr(annotation, "__name__", str(annotation))


_SPLIT_DOC = "which templates and combinations: held-out only, training only, or all"
_BOS_DOC = "prepend the tokenizer's BOS token"

BUILTIN_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="ioi",
            builder=make_ioi,
            summary="Indirect object identification: 'When Mary and John went to the store, "
            "John gave a drink to' -> ' Mary'",
            metric="logit(IO) - logit(S) at the last prompt token",
            higher_is_better=True,
            params={
                "n_prompts": "number of prompts (half ABBA, half BABA)",
                "seed": "random seed",
                "split": _SPLIT_DOC + " (templates and name pairs)",
                "prepend_bos": _BOS_DOC,
                "corruption": "abc: three new distinct names; swap_s: S2 replaced by IO",
            },
            choices={"split": SPLITS, "corruption": CORRUPTIONS},
        ),
        TaskSpec(
            name="greater_than",
            builder=make_greater_than,
            summary="Greater-than: 'The war lasted from the year 1732 to the year 17' -> YY > 32",
            metric="sum p(YY > start) - sum p(YY <= start) over the suffix tokens 00..99",
            higher_is_better=True,
            params={
                "n_prompts": "number of prompts",
                "seed": "random seed",
                "split": _SPLIT_DOC + " (templates and (century, start year) combinations)",
                "prepend_bos": _BOS_DOC,
            },
            choices={"split": SPLITS},
        ),
        TaskSpec(
            name="induction",
            builder=make_induction,
            summary="Induction: random word tokens repeated twice",
            metric="mean loss on the second copy (nats); lower is better",
            higher_is_better=False,
            params={
                "n_prompts": "number of prompts",
                "half_len": "length of the random sequence that is repeated",
                "seed": "random seed",
                "prepend_bos": _BOS_DOC,
            },
            choices={},
        ),
        TaskSpec(
            name="custom",
            builder=make_custom,
            summary="Your own prompt pairs: [{clean, corrupt, correct, wrong}]",
            metric="logit(correct) - logit(wrong) at the last prompt token",
            higher_is_better=True,
            params={
                "pairs": "list of {clean, corrupt, correct, wrong}; answers single tokens, "
                "clean and corrupt the same length in tokens",
                "prepend_bos": _BOS_DOC,
                "name": "name of the task in results",
            },
            choices={},
        ),
    )
}


def describe_builtin_tasks() -> list[dict[str, Any]]:
    """Every built-in task with its parameters and their defaults (for GET /tasks)."""
    return [spec.describe() for spec in BUILTIN_TASKS.values()]


def build_task(name: str, tokenizer: Any, **params: Any) -> TaskBatch:
    """Build the built-in task `name` for `tokenizer` with `params` (the rest default)."""
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    spec = BUILTIN_TASKS[name]
    unknown = set(params) - set(spec.params)
    if unknown:
        raise ValueError(f"task {name!r} has no parameter(s) {', '.join(sorted(unknown))}")
    return spec.builder(tokenizer, **params)
