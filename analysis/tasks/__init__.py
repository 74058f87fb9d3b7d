"""Built-in tasks (IOI, greater-than, induction, custom pairs) and their evaluation."""

from lnscope.analysis.tasks.base import LogitDiffBatch, TaskBatch
from lnscope.analysis.tasks.custom import CustomBatch, make_custom
from lnscope.analysis.tasks.evaluate import (
    BUILTIN_TASKS,
    TaskResult,
    TaskSpec,
    build_task,
    describe_builtin_tasks,
    evaluate_task,
)
from lnscope.analysis.tasks.greater_than import GreaterThanBatch, make_greater_than, year_tokens
from lnscope.analysis.tasks.induction import InductionBatch, make_induction
from lnscope.analysis.tasks.ioi import IOIBatch, make_ioi

__all__ = [
    "BUILTIN_TASKS",
    "CustomBatch",
    "GreaterThanBatch",
    "IOIBatch",
    "InductionBatch",
    "LogitDiffBatch",
    "TaskBatch",
    "TaskResult",
    "TaskSpec",
    "build_task",
    "describe_builtin_tasks",
    "evaluate_task",
    "make_custom",
    "make_greater_than",
    "make_induction",
    "make_ioi",
    "year_tokens",
]
