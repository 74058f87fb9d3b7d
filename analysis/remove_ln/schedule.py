"""When each LayerNorm is switched to FakeLN.

Order: ln_2 block by block, then ln_1 (Q/K) block by block, then ln_1 (V) block by block,
then ln_f. Step s means "fake from the start of optimiser step s on" (steps count from 0;
sigma_avg is the EMA measured up to step s - 1).

The paper's schedules (start; gaps ln2/ln1qk/ln1v; ln_f step; total) are, for GPT-2 small
20; 2/2/3; 104; 300, medium 20; 2/2/3; 188; 500, large 30; 4/4/6; 534; 600, xl 50; 4/4/6;
722; 800. All four satisfy

    ln_f_step = start + n_layer * (gap_ln2 + gap_ln1qk + gap_ln1v)     (+ margin, 0 there)

i.e. each group continues one gap after the previous group's last block. `Schedule.from_depth`
generalises this with a scale factor s applied to the small/medium numbers:

    start = max(1, round(20 s)),  gap_ln2 = gap_ln1qk = max(1, round(2 s)),  gap_ln1v = max(1, round(3 s))
    ln_f_step   = start + n_layer * (gap_ln2 + gap_ln1qk + gap_ln1v) + ln_f_margin
    total_steps = 3 * ln_f_step                                      (small: 312 ~ the paper's 300)

    s = scale                                  if given
      = total_steps / (3 * (20 + 7 n_layer))   if only total_steps is given (fits the budget)
      = max(1, 12 / n_layer)                   otherwise (shallow models get the removal phase
                                                          of GPT-2 small, ~84 steps, not fewer)

so a 4-layer model defaults to s = 3: start 60, gaps 6/6/9, ln_f 144, total 432, and
`from_depth(4, total_steps=1000)` gives s = 6.94: start 139, gaps 14/14/21, ln_f 335.
Every field can be overridden; explicit values win over the formula.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lnscope.analysis.errors import ConfigError

from .fake_ln import LN_KINDS

# GPT-2 small / medium (the base of the formula)
BASE_START = 20
BASE_GAPS = {"ln_2": 2, "ln_1_qk": 2, "ln_1_v": 3}
TOTAL_OVER_LN_F = 3


@dataclass(frozen=True)
class Schedule:
    n_layer: int
    start_step: int
    gap_ln2: int
    gap_ln1qk: int
    gap_ln1v: int
    ln_f_step: int
    total_steps: int

    def __post_init__(self) -> None:
        if self.n_layer < 1:
            raise ConfigError(f"schedule: n_layer must be >= 1, got {self.n_layer}")
        if self.start_step < 1:
            raise ConfigError(
                f"schedule: start_step must be >= 1 (sigma_avg is measured on step 0), got {self.start_step}"
            )
        for name in ("gap_ln2", "gap_ln1qk", "gap_ln1v"):
            if getattr(self, name) < 0:
                raise ConfigError(f"schedule: {name} must be >= 0, got {getattr(self, name)}")
        last_block = self._block_events()[-1][0]
        if self.ln_f_step < last_block:
            raise ConfigError(
                f"schedule: ln_f_step {self.ln_f_step} comes before the last ln_1 (V) removal at step {last_block}"
            )
        if self.total_steps <= self.ln_f_step:
            raise ConfigError(
                f"schedule: total_steps ({self.total_steps}) must be greater than ln_f_step ({self.ln_f_step}); "
                "lower the scale or raise total_steps"
            )

    @classmethod
    def from_depth(
        cls,
        n_layer: int,
        *,
        start_step: int | None = None,
        gap_ln2: int | None = None,
        gap_ln1qk: int | None = None,
        gap_ln1v: int | None = None,
        ln_f_step: int | None = None,
        total_steps: int | None = None,
        scale: float | None = None,
        ln_f_margin: int = 0,
    ) -> "Schedule":
        """The default schedule for a model of `n_layer` blocks (formula in the module docstring)."""
        if n_layer < 1:
            raise ConfigError(f"schedule: n_layer must be >= 1, got {n_layer}")
        if scale is None:
            if total_steps is not None:
                scale = total_steps / (TOTAL_OVER_LN_F * (BASE_START + sum(BASE_GAPS.values()) * n_layer))
            else:
                scale = max(1.0, 12.0 / n_layer)
        if scale <= 0:
            raise ConfigError(f"schedule: scale must be > 0, got {scale}")
        start = start_step if start_step is not None else max(1, round(BASE_START * scale))
        g2 = gap_ln2 if gap_ln2 is not None else max(1, round(BASE_GAPS["ln_2"] * scale))
        gqk = gap_ln1qk if gap_ln1qk is not None else max(1, round(BASE_GAPS["ln_1_qk"] * scale))
        gv = gap_ln1v if gap_ln1v is not None else max(1, round(BASE_GAPS["ln_1_v"] * scale))
        lnf = ln_f_step if ln_f_step is not None else start + n_layer * (g2 + gqk + gv) + ln_f_margin
        total = total_steps if total_steps is not None else TOTAL_OVER_LN_F * lnf
        return cls(n_layer, start, g2, gqk, gv, lnf, total)

    def _block_events(self) -> list[tuple[int, str]]:
        events: list[tuple[int, str]] = []
        step = self.start_step
        gaps = {"ln_2": self.gap_ln2, "ln_1_qk": self.gap_ln1qk, "ln_1_v": self.gap_ln1v}
        for kind in LN_KINDS:
            for i in range(self.n_layer):
                events.append((step, f"blocks.{i}.{kind}"))
                step += gaps[kind]
        return events

    def events(self) -> list[tuple[int, str]]:
        """(step, LN site) for every site, in removal order (steps non-decreasing)."""
        return self._block_events() + [(self.ln_f_step, "ln_f")]

    def removal_steps(self) -> dict[str, int]:
        return {name: step for step, name in self.events()}

    def events_by_step(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for step, name in self.events():
            out.setdefault(step, []).append(name)
        return out

    def to_dict(self) -> dict:
        return asdict(self)
