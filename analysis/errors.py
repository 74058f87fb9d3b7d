"""Errors lnscope expects and explains. Anything raising these reaches users as a message."""

from __future__ import annotations


class LnscopeError(Exception):
    """Base class: an error with a message meant for the user, not a traceback."""


class UnknownPairError(LnscopeError, KeyError):
    """A pair name that no built-in or configured pair has."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownRoleError(LnscopeError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(LnscopeError, ValueError):
    """An lnscope.toml that cannot be read or names something invalid."""


class ModelLoadError(LnscopeError, RuntimeError):
    """A model that cannot be loaded: missing path, unreachable Hub id, bad format."""


class NotLnFreeError(ModelLoadError):
    """A checkpoint registered as `ln_free` whose LayerNorms are not in the released form."""
