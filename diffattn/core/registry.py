"""Lookups in the static tables of the layers above (methods, adapters): nothing registers itself
at import time; a miss raises with every valid name."""

from __future__ import annotations

from typing import Any


def lookup(table: dict[str, Any], name, what: str, hint: str = "") -> Any:
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"diffattn: unknown {what} {name!r}; available {what}s: {sorted(table)}{hint}")
    return table[name]
