"""Compose's variable interpolation, enough of it to check deploy/compose without Docker.

Supported as Compose does: `$$` (a literal `$`), `$VAR`, `${VAR}`, `${VAR:-default}`,
`${VAR-default}`, `${VAR:?message}`, `${VAR?message}`, `${VAR:+alt}`, `${VAR+alt}`. Anything
else after a `$` is an error, as Compose reports it ("invalid interpolation format").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_TOKEN = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>))"
)


class InterpolationError(ValueError):
    pass


class MissingVariable(InterpolationError):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"required variable {name} is missing a value: {message}")
        self.name = name


def interpolate_str(text: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        name = m.group("braced")
        if name is None:
            raise InterpolationError(f"invalid interpolation format in {text!r}")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        unset_or_empty = value is None or (op or "").startswith(":") and value == ""
        if op is None:
            return value or ""
        if op.endswith("-"):
            return arg if unset_or_empty else str(value)
        if op.endswith("?"):
            if unset_or_empty:
                raise MissingVariable(name, arg)
            return str(value)
        return "" if unset_or_empty else arg  # "+"

    return _TOKEN.sub(sub, text)


def interpolate(doc: Any, env: Mapping[str, str]) -> Any:
    """The document with every string value interpolated (keys are left alone, as Compose does)."""
    if isinstance(doc, dict):
        return {k: interpolate(v, env) for k, v in doc.items()}
    if isinstance(doc, list):
        return [interpolate(v, env) for v in doc]
    if isinstance(doc, str):
        return interpolate_str(doc, env)
    return doc


def references(text: str) -> list[tuple[str, str | None, str]]:
    """Every `${VAR<op><arg>}` in a file's text: (VAR, op or None, arg)."""
    return [(m.group("braced"), m.group("op"), m.group("arg") or "")
            for m in _TOKEN.finditer(text) if m.group("braced")]
