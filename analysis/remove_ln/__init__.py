"""`lnscope remove-ln`: FakeLN fine-tuning of a GPT-2 checkpoint into its LayerNorm-free twin.

Public API (imported lazily, so `lnscope --help` does not load plotly), by module of lnscope.analysis.remove_ln:

    RemoveLNConfig, RemoveLNResult, remove_layernorm,
    load_text_tokens                                      train
    Schedule                                              schedule
    FakeLNGPT2, removal_order, aux_std_loss               fake_ln
    export_ln_free, export_control, fold_v_scale,
    released_ln_free_model                                export
    write_report                                          report
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RemoveLNConfig": "train",
    "RemoveLNResult": "train",
    "remove_layernorm": "train",
    "load_text_tokens": "train",
    "Schedule": "schedule",
    "FakeLNGPT2": "fake_ln",
    "removal_order": "fake_ln",
    "aux_std_loss": "fake_ln",
    "export_ln_free": "export",
    "export_control": "export",
    "fold_v_scale": "export",
    "released_ln_free_model": "export",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
