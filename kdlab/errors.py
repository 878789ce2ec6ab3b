"""User-facing errors: one line that names the bad value, raised before any training starts."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KdlabError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""


class ConfigError(KdlabError):
    """A config file or override is unknown, ill-typed or inconsistent."""


class DataNotFoundError(ConfigError):
    """A dataset's files are not on this machine (kdlab never downloads); planning cannot read it."""


class UnknownNameError(KdlabError):
    """A name that is not in a registry (method, model, dataset, experiment, ...)."""


class CheckpointError(KdlabError):
    """A checkpoint that is missing, unreadable or does not fit the model it is loaded into."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ``did you mean 'a', 'b'?`` hint (empty when nothing is close), for one-line errors."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        lowered = name.lower()
        close = [c for c in choices if lowered in c.lower() or c.lower() in lowered][:n]
    if not close:
        return ""
    return "did you mean " + ", ".join(f"'{c}'" for c in close) + "?"


def unknown(kind: str, name: str, choices: Iterable[str]) -> UnknownNameError:
    """Build the standard "unknown <kind> 'x'; did you mean ...? (valid: ...)" error."""
    choices = sorted(choices)
    hint = did_you_mean(name, choices)
    valid = ", ".join(choices) if len(choices) <= 40 else ", ".join(choices[:40]) + ", ..."
    message = f"unknown {kind} '{name}'"
    if hint:
        message += f"; {hint}"
    return UnknownNameError(f"{message} (valid: {valid})")
