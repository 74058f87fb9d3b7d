"""A test-only analysis kind whose per-role unit reports stages, and can block, sleep or fail on request."""

import threading
import time

from pydantic import BaseModel, Field

from lnscope.analysis.kinds import Kind, KindOptions

GATE = threading.Event()
RUNNING: list[str] = []  # the tag of every job that reached its combine step
MAX_CONCURRENT: list[int] = [0]  # the most units running at once
_active = [0]
_lock = threading.Lock()


class ProbeOptions(KindOptions):
    stages: int = Field(3, ge=1, le=100)
    block: bool = False
    fail: str | None = None
    tag: str = ""
    sleep_s: float = Field(0.01, ge=0, le=5)


class ProbePartial(BaseModel):
    n_layers: int


class ProbeResult(BaseModel):
    stages: int
    roles: list[str]
    n_layers: dict[str, int]
    tag: str
    manifest: dict


def probe_unit(ctx) -> ProbePartial:
    with _lock:
        _active[0] += 1
        MAX_CONCURRENT[0] = max(MAX_CONCURRENT[0], _active[0])
    try:
        for i in range(ctx.options.stages):
            ctx.progress.stage(f"probe stage {i}", i / ctx.options.stages)
            if ctx.options.block:
                GATE.wait(timeout=10)
            else:
                time.sleep(ctx.options.sleep_s)
        if ctx.options.fail == "oom":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if ctx.options.fail == "bug":
            raise ZeroDivisionError("boom")
        return ProbePartial(n_layers=ctx.model.bridge.cfg.n_layers)
    finally:
        with _lock:
            _active[0] -= 1


def combine_probe(partials, ctx) -> ProbeResult:
    RUNNING.append(ctx.options.tag)
    return ProbeResult(stages=ctx.options.stages, roles=list(partials), tag=ctx.options.tag,
                       n_layers={r: p.n_layers for r, p in partials.items()}, manifest={"pair": ctx.pair_name})


PROBE = Kind("probe", "test kind", inputs="prompts_or_task", options=ProbeOptions, unit=probe_unit,
             combine=combine_probe)
