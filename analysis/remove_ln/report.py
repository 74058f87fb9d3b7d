"""A self-contained HTML report of a remove-ln run (plotly.js inlined; no CDN, no network)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

_COLORS = {"ln_free": "#d62728", "control": "#1f77b4"}


def _clean(values: list[Any]) -> list[float | None]:
    return [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in values]


def build_figure(log: dict[str, Any]) -> go.Figure:
    """Loss, aux loss, lr and sigma_avg curves, with a dotted line at every LN removal."""
    runs = log.get("runs", {})
    fig = make_subplots(
        rows=4, cols=1, shared_xaxes=True, vertical_spacing=0.05,
        row_heights=[0.32, 0.18, 0.32, 0.18],
        subplot_titles=("cross-entropy loss", "auxiliary loss (ln_f input std)",
                        "sigma_avg per LayerNorm (LN-free run)",
                        "learning rate"),
    )
    for role, run in runs.items():
        color = _COLORS.get(role)
        fig.add_trace(go.Scatter(x=run["steps"], y=_clean(run["loss"]), name=f"{role} loss", mode="lines",
                                 line={"color": color}), row=1, col=1)
        if any(v is not None for v in run.get("aux_loss", [])):
            fig.add_trace(go.Scatter(x=run["steps"], y=_clean(run["aux_loss"]), name=f"{role} aux loss",
                                     mode="lines", line={"color": color, "dash": "dot"}), row=2, col=1)
        fig.add_trace(go.Scatter(x=run["steps"], y=_clean(run["lr"]), name=f"{role} lr", mode="lines",
                                 line={"color": color}, showlegend=False), row=4, col=1)
    ln_free = runs.get("ln_free")
    if ln_free:
        for name, values in ln_free.get("sigma", {}).items():
            removed = ln_free.get("removed_at", {}).get(name)
            fig.add_trace(go.Scatter(
                x=ln_free["steps"], y=_clean(values), name=f"sigma {name}", mode="lines", legendgroup="sigma",
                hovertemplate=f"{name}<br>step %{{x}}<br>sigma_avg %{{y:.5g}}"
                              + (f"<br>fake from step {removed}" if removed is not None else "") + "<extra></extra>",
            ), row=3, col=1)
        removed = ln_free.get("removed_at", {})
        by_step: dict[int, list[str]] = {}
        for name, step in removed.items():
            by_step.setdefault(int(step), []).append(name)
        for step in sorted(by_step):
            fig.add_vline(x=step, line={"color": "grey", "width": 1, "dash": "dot"}, opacity=0.5, row="all", col=1)
        losses = [v for v in _clean(ln_free["loss"]) if v is not None]
        if by_step and losses:
            fig.add_trace(go.Scatter(
                x=sorted(by_step), y=[max(losses)] * len(by_step), mode="markers", name="LN removed",
                marker={"symbol": "triangle-down", "color": "grey", "size": 8},
                text=[", ".join(by_step[s]) for s in sorted(by_step)],
                hovertemplate="step %{x}: %{text} -> FakeLN<extra></extra>",
            ), row=1, col=1)
    fig.update_xaxes(title_text="step", row=4, col=1)
    fig.update_yaxes(type="log", row=3, col=1)
    fig.update_layout(height=1100, template="plotly_white", hovermode="closest",
                      title="lnscope remove-ln: FakeLN fine-tuning")
    return fig


def _summary_html(log: dict[str, Any]) -> str:
    runs = log.get("runs", {})
    rows = []
    for role, run in runs.items():
        tail = [v for v in run["loss"][-10:] if v is not None]
        final = sum(tail) / len(tail) if tail else float("nan")
        rows.append(f"<tr><td>{html.escape(role)}</td><td>{len(run['steps'])}</td><td>{final:.4f}</td></tr>")
    ln_free = runs.get("ln_free", {})
    sigma_rows = []
    for name in log.get("ln_names", []):
        values = ln_free.get("sigma", {}).get(name) or []
        removed = ln_free.get("removed_at", {}).get(name)
        last = f"{values[-1]:.6g}" if values else ""
        sigma_rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{'' if removed is None else removed}</td><td>{last}</td></tr>"
        )
    config = html.escape(json.dumps({"source": log.get("source"), "schedule": log.get("schedule", {}),
                                     "config": log.get("config", {}), "data": log.get("data", {})}, indent=1))
    return (
        "<h2>Runs</h2><table><tr><th>run</th><th>steps</th><th>final loss (mean of last 10)</th></tr>"
        + "".join(rows) + "</table>"
        "<h2>LayerNorms</h2><table><tr><th>site</th><th>fake from step</th><th>sigma_avg</th></tr>"
        + "".join(sigma_rows) + "</table>"
        f"<details><summary>settings</summary><pre>{config}</pre></details>"
    )


def render_html(log: dict[str, Any]) -> str:
    plot = pio.to_html(build_figure(log), include_plotlyjs=True, full_html=False)
    style = ("body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}")
    return (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>lnscope remove-ln report</title>"
        f"<style>{style}</style></head><body><h1>lnscope remove-ln</h1>"
        f"<p>source: <code>{html.escape(str(log.get('source')))}</code></p>"
        f"{plot}{_summary_html(log)}</body></html>\n"
    )


def write_report(log: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render_html(log), encoding="utf-8")
    return path
