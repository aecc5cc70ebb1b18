"""Type checks of the values a configuration file gives for a config dataclass's fields.

The simulation, synthesis and atlas configs are read from YAML / JSON (``brainshift simulate --config``,
``simulate-batch --config``, ``atlas --config``). Their range checks compare numbers, so a value of the wrong
type (``resolution_mm: abc``, ``drainage_fractions: 0.5``, ``simulation: 3``) was a ``TypeError`` traceback,
and some were used as they came (``resection: 'no'`` is a true string, ``n_solves: 2.7``, ``seed: 1.5``).
:func:`check_field_values` refuses them by the field's annotation, naming the field, the type expected and the
value found.

Numbers written as strings are read as numbers, as the training config reads them: PyYAML follows YAML 1.1, where
a float needs a dot, so ``solver_rtol: 1e-6`` arrives as the string ``'1e-6'`` (``1.0e-6`` is a float); quoted
numbers (``'0.45'``) are read the same way. Booleans stay strict (``'no'`` is refused, not read as true).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from brainshift.errors import BrainshiftError

_DESCRIPTIONS = {"float": "a finite number", "int": "an integer", "bool": "true or false", "str": "a string",
                 "dict": "a mapping"}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _as_number(v: Any, kind: str) -> Any:
    """``v`` as a float / int when it is a string spelling a finite number (an integer for ``int``), else ``v``."""
    if not isinstance(v, str) or kind not in ("float", "int"):
        return v
    try:
        x = int(v.strip()) if kind == "int" else float(v.strip())
    except ValueError:
        return v
    return x if kind == "int" or math.isfinite(x) else v


def _is_kind(v: Any, kind: str) -> bool:
    if kind == "float":
        return _is_number(v)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str)
    if kind == "dict":
        return isinstance(v, dict)
    return True  # annotations this module does not know are left to the config's own checks


def check_field_values(values: dict, cls: type, where: str, list_items: dict[str, str] | None = None) -> dict:
    """Refuse values of the wrong type for the fields of the dataclass ``cls`` (its string annotations).

    Annotations understood: ``float`` (a finite number, not a boolean), ``int`` (an integer, not a boolean), ``bool``,
    ``str``, ``dict``, ``list`` (items ``list_items[name]``, default ``float``), ``tuple[float, float]``-style
    fixed-length tuples, each optionally ``| None``. Keys that are not fields are left to the caller.

    Args:
        values: the field values read from a file.
        cls: the config dataclass.
        where: what the message calls the config (e.g. ``"the atlas config"``).
        list_items: the item type of ``list`` fields whose items are not numbers (e.g. ``{"contact_models":
            "str"}``).

    Returns:
        A copy of ``values`` where numbers given as strings (``'1e-6'``, see the module docstring) are numbers;
        other values unchanged. Use it in place of ``values``.

    Raises:
        BrainshiftError: ``expected <field> in <where> as <type>, got <value>`` for the first bad value.
    """
    list_items = list_items or {}
    out = dict(values)
    kinds = {f.name: str(f.type).replace(" ", "") for f in dataclasses.fields(cls)}
    for name, value in values.items():
        kind = kinds.get(name)
        if kind is None:
            continue
        optional = kind.endswith("|None")
        kind = kind.removesuffix("|None")
        if kind == "list":
            item = list_items.get(name, "float")
            desc = f"a list of {'strings' if item == 'str' else 'numbers'}"
            if isinstance(value, list | tuple):
                value = type(value)(_as_number(v, item) for v in value)
            ok = isinstance(value, list | tuple) and all(_is_kind(v, item) for v in value)
        elif kind.startswith("tuple[") and kind.endswith("]"):
            items = kind[len("tuple["):-1].split(",")
            desc = f"a list of {len(items)} {'integers' if items[0] == 'int' else 'numbers'}"
            if isinstance(value, list | tuple) and len(value) == len(items):
                value = type(value)(_as_number(v, k) for v, k in zip(value, items, strict=True))
            ok = (isinstance(value, list | tuple) and len(value) == len(items)
                  and all(_is_kind(v, k) for v, k in zip(value, items, strict=True)))
        else:
            value = _as_number(value, kind)
            desc, ok = _DESCRIPTIONS.get(kind, kind), _is_kind(value, kind)
        if value is None:
            ok = optional
        if not ok:
            raise BrainshiftError(f"expected {name} in {where} as {desc}{' or null' if optional else ''}, got "
                                  f"{'null' if value is None else repr(value)}")
        out[name] = value
    return out
