"""Options: family defaults, then the pipeline's declared defaults, then the user's options.

A method config is a frozen dataclass. ``resolve`` builds it from three layers, later ones winning:
1. the method's ``FAMILY_DEFAULTS[family]`` (the reference settings for that model family);
2. defaults the pipeline declares for itself (``pipe.diffattn_defaults[method]``: e.g. the testbed's
   small frames want smaller blocks), so ``apply`` and the CLI agree because both read them here;
3. the user's keyword options.
Unknown options raise with the valid ones; an option that belongs to another method says which.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any


def config_fields(config_cls) -> list[str]:
    return [f.name for f in fields(config_cls)]


def resolve(
    method: str,
    config_cls,
    family: str,
    family_defaults: dict[str, dict[str, Any]],
    user: dict[str, Any],
    *,
    declared: dict[str, Any] | None = None,
    knobs: tuple[str, ...] = (),
    owners: dict[str, list[str]] | None = None,
):
    """(config, performance knobs) for ``method`` on ``family``."""
    known = set(config_fields(config_cls))
    unknown = sorted(set(user) - known - set(knobs))
    if unknown:
        hints = []
        for name in unknown:
            others = [m for m in (owners or {}).get(name, []) if m != method]
            if others:
                hints.append(f"{name!r} is an option of {others}, not of {method!r}")
        hint = ("; " + "; ".join(hints)) if hints else ""
        raise ValueError(
            f"{method}: unknown option(s) {unknown}{hint}; valid options are {sorted(known)}"
            + (f" and the keyword-only knobs {list(knobs)}" if knobs else "")
        )
    values = {**family_defaults.get(family, {}), **{k: v for k, v in (declared or {}).items() if k in known}}
    values.update({k: v for k, v in user.items() if k in known})
    knob_values = {k: v for k, v in {**(declared or {}), **user}.items() if k in knobs}
    return replace(config_cls(), **values), knob_values
