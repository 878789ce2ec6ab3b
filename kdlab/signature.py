"""Check user keyword arguments against a factory's typed signature before calling it.

Models, datasets and methods take their options as keyword arguments from YAML; a misspelled or
ill-typed option must fail with a message that names it and lists the valid ones.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from kdlab.errors import ConfigError, did_you_mean

_SCALARS = (bool, int, float, str)


def accepted_kwargs(factory: Callable[..., Any], reserved: tuple[str, ...] = ()) -> dict[str, inspect.Parameter]:
    """Keyword parameters a user may set (``reserved`` ones are filled in by kdlab itself)."""
    params = inspect.signature(factory).parameters
    return {
        name: p
        for name, p in params.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in reserved and name != "self"
    }


def check_kwargs(
    factory: Callable[..., Any], kwargs: Mapping[str, Any], what: str, reserved: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Validate names and scalar types of ``kwargs`` for ``factory``; return them coerced."""
    params = accepted_kwargs(factory, reserved)
    # ``**kwargs`` accepts anything, unless it only forwards the reserved options to a base class.
    takes_var_kwargs = not reserved and any(
        p.kind == p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values()
    )
    hints = _type_hints(factory)
    checked: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in reserved:
            raise ConfigError(f"{what}: '{key}' is set by kdlab and cannot be given here")
        if key not in params:
            if takes_var_kwargs:
                checked[key] = value
                continue
            hint = did_you_mean(key, params)
            valid = ", ".join(params) or "none"
            raise ConfigError(f"{what}: unknown option '{key}'{'; ' + hint if hint else ''} (valid: {valid})")
        checked[key] = _coerce(value, hints.get(key), f"{what}: option '{key}'")
    return checked


def _type_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable annotations just skip type checking
        return {}


def _coerce(value: Any, annotation: Any, what: str) -> Any:
    """Coerce YAML scalars to the annotated scalar type (int -> float is fine; 'abc' -> int is not)."""
    allowed = _scalar_types(annotation)
    if not allowed or (value is None and type(None) in allowed):
        return value
    if isinstance(value, bool) and bool in allowed:
        return value
    for kind in (int, float, str):
        if kind in allowed and isinstance(value, kind) and not isinstance(value, bool):
            return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    names = " or ".join(sorted(t.__name__ for t in allowed if t is not type(None)))
    raise ConfigError(f"{what} must be {names}, got {value!r}")


def _scalar_types(annotation: Any) -> set[type]:
    """The scalar types an annotation allows; empty (no check) for anything richer."""
    if annotation in _SCALARS:
        return {annotation}
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return set()
    args = typing.get_args(annotation)
    if all(a in _SCALARS or a is type(None) for a in args):
        return set(args)
    return set()
