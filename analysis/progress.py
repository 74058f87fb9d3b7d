"""Progress and cancellation, reported by the analysis code itself (stage + fraction)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol, TypeVar

from lnscope.analysis.errors import LnscopeError

T = TypeVar("T")


class Cancelled(LnscopeError):
    """Raised at a stage boundary when the caller asked to stop."""


class ProgressFn(Protocol):
    def __call__(self, stage: str, fraction: float) -> None: ...


class Progress:
    """Reports (stage, fraction in [0, 1]) to a callback; `check()` raises Cancelled if asked to stop.

    Analyses call `progress.stage("activation patching", done / total)` at stage boundaries;
    a job runner passes `on_progress` and `should_cancel`. `Progress.none()` does nothing.
    """

    def __init__(self, on_progress: Callable[[str, float], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> None:
        self._on_progress = on_progress
        self._should_cancel = should_cancel

    @classmethod
    def none(cls) -> "Progress":
        return cls()

    def check(self) -> None:
        if self._should_cancel is not None and self._should_cancel():
            raise Cancelled("cancelled")

    def stage(self, name: str, fraction: float) -> None:
        """A stage boundary: report, then stop here if cancellation was asked for."""
        if self._on_progress is not None:
            self._on_progress(name, min(max(float(fraction), 0.0), 1.0))
        self.check()

    def span(self, prefix: str, start: float, end: float) -> "Progress":
        """A child reporting into [start, end] of this fraction, its stage names prefixed."""
        return _Span(self, prefix, start, end)

    def iterate(self, items: Iterable[T], name: str, total: int | None = None,
                start: float = 0.0, end: float = 1.0) -> Iterator[T]:
        """Yield items, reporting the fraction between `start` and `end` before each one."""
        items = list(items) if total is None else items
        total = total if total is not None else len(items)  # type: ignore[arg-type]
        for i, item in enumerate(items):
            self.stage(name, start + (end - start) * i / max(total, 1))
            yield item
        self.stage(name, end)


class _Span(Progress):
    def __init__(self, parent: Progress, prefix: str, start: float, end: float) -> None:
        super().__init__()
        self.parent, self.prefix, self.start, self.end = parent, prefix, start, end

    def check(self) -> None:
        self.parent.check()

    def stage(self, name: str, fraction: float) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        self.parent.stage(f"{self.prefix}{name}", self.start + (self.end - self.start) * fraction)


def ensure(progress: Progress | None) -> Progress:
    return progress if progress is not None else Progress.none()
