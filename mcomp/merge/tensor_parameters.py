"""Per-tensor parameter values, resolved as mergekit resolves them (`mergekit.config.evaluate_setting` and
`mergekit.parameter_resolver`).

A setting is a scalar, a *gradient* (a list of scalars) or a list of `{filter: ..., value: ...}` conditionals:

* scalar: the value itself.
* gradient: the value at the tensor's position t in [0, 1] (`t = i / (L − 1)` for layer i of a slice of L
  layers, 1 for a one-layer slice, 0 for tensors outside the layers): with numbers, linear interpolation
  between entries `floor(t·(k−1))` and the next one; a list holding booleans or strings picks entry
  `int(t·(k−1))`.
* conditionals: the first one whose `filter` is absent, `"*"` or a substring of the tensor name gives the
  value (itself a scalar or gradient); when none matches there is no value at this level.

A parameter is looked up in the scopes from the most to the least specific (a model's own `parameters`,
its slice's, the top-level `parameters`); the first scope giving a value wins, else the default, else the
parameter is missing (an error naming the parameter, the model and the tensor).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

REQUIRED = object()  # a parameter without a default
SCALAR_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class ParameterKind:
    """What values a parameter takes: `float`, `bool` or `optional_float` (a float or null)."""

    name: str
    kind: str
    default: Any = REQUIRED

    def validate(self, value: Any, where: str) -> Any:
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: parameter {self.name!r} must be true or false, got {value!r}")
            return value
        if value is None and self.kind == "optional_float":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: parameter {self.name!r} must be a number, got {value!r}")
        return float(value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, SCALAR_TYPES)


def _is_conditional(value: Any) -> bool:
    return isinstance(value, dict)


def check_setting(setting: Any, where: str) -> None:
    """Refuse a setting of no form mergekit reads (errors name `where`, e.g. `file: models[0].parameters.t`)."""
    if _is_scalar(setting):
        return
    if _is_conditional(setting):
        unknown = sorted(set(setting) - {"filter", "value"})
        if unknown or "value" not in setting:
            raise ValueError(
                f"{where}: a conditional takes 'value' and optionally 'filter', got keys {sorted(setting)}"
            )
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise ValueError(f"{where}: 'filter' must be a string, got {setting['filter']!r}")
        value = setting["value"]
        if _is_conditional(value) or (isinstance(value, list) and any(not _is_scalar(v) for v in value)):
            raise ValueError(f"{where}: a conditional's value must be a scalar or a gradient (a list of scalars)")
        check_setting(value, f"{where}.value")
        return
    if isinstance(setting, list):
        if not setting:
            raise ValueError(f"{where}: an empty list is neither a gradient nor a list of conditionals")
        if all(_is_scalar(v) for v in setting):
            return
        if all(_is_conditional(v) for v in setting):
            for i, cond in enumerate(setting):
                check_setting(cond, f"{where}[{i}]")
            return
        raise ValueError(
            f"{where}: a list must hold only scalars (a gradient) or only {{filter, value}} conditionals, "
            f"got {setting!r}"
        )
    raise ValueError(f"{where}: a parameter value must be a scalar, a gradient or conditionals, got {setting!r}")


def filters_of(setting: Any) -> list[str]:
    """The filter strings a setting holds (to check each matches some tensor)."""
    conditions = [setting] if _is_conditional(setting) else setting if isinstance(setting, list) else []
    return [c["filter"] for c in conditions if _is_conditional(c) and c.get("filter") not in (None, "*")]


def gradient_value(values: list, t: float, kind: ParameterKind, where: str) -> Any:
    """A gradient's value at t (mergekit's rule: numbers interpolate, other values are picked)."""
    validated = [kind.validate(v, where) for v in values]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in validated):
        return validated[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return kind.validate((1 - frac) * validated[i0] + frac * validated[i1], where)


def evaluate_setting(setting: Any, tensor_name: str, t: float, kind: ParameterKind, where: str) -> Any:
    """The setting's value for `tensor_name` at position t, or None where no conditional matches."""
    if _is_conditional(setting):
        setting = [setting]
    if _is_scalar(setting):
        return kind.validate(setting, where)
    if all(_is_scalar(v) for v in setting):
        return gradient_value(setting, t, kind, where)
    for cond in setting:
        pattern = cond.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t, kind, where)
    return None


def resolve(
    kind: ParameterKind, scopes: Iterable[tuple[dict | None, str]], tensor_name: str, t: float, owner: str
) -> Any:
    """The parameter's value: the first scope (settings, where) that gives one, else its default.

    `owner` names the model or `the merge` in the error for a missing required parameter."""
    for settings, where in scopes:
        if settings and kind.name in settings:
            value = evaluate_setting(settings[kind.name], tensor_name, t, kind, f"{where}.{kind.name}")
            if value is not None:
                return value
    if kind.default is REQUIRED:
        raise ValueError(f"missing required parameter {kind.name!r} for {owner}, tensor {tensor_name!r}")
    return kind.default
