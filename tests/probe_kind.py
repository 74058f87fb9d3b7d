"""A test-only analysis kind that reports stages, can block, sleep or fail on request."""

import threading
import time

from pydantic import BaseModel, ConfigDict, Field

GATE = threading.Event()
RUNNING: list[str] = []
MAX_CONCURRENT: list[int] = [0]
_active = [0]
_lock = threading.Lock()


class ProbeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stages: int = Field(3, ge=1, le=100)
    block: bool = False
    fail: str | None = None
    tag: str = ""
    sleep_s: float = Field(0.01, ge=0, le=5)


class ProbeResult(BaseModel):
    stages: int
    roles: list[str]
    n_layers: dict[str, int]
    tag: str
    manifest: dict


def run_probe(ctx):
    with _lock:
        _active[0] += 1
        MAX_CONCURRENT[0] = max(MAX_CONCURRENT[0], _active[0])
    try:
        RUNNING.append(ctx.options.tag)
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
        return ProbeResult(stages=ctx.options.stages, roles=list(ctx.models), tag=ctx.options.tag,
                           n_layers={r: m.bridge.cfg.n_layers for r, m in ctx.models.items()},
                           manifest={"pair": ctx.pair.name})
    finally:
        with _lock:
            _active[0] -= 1
