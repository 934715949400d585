"""Checks shared by the config dataclasses: every field holds a value of its default's type, and
every number is finite (a NaN would pass any range test and then break resuming, since NaN != NaN)."""

from __future__ import annotations

import dataclasses
import math
from typing import List


def field_problems(config) -> List[str]:
    """Type and finiteness problems of ``config``'s fields, judged against a default instance: a
    float field takes a finite real number, an int field an integer (not a bool), a bool field a
    bool, a str field a str. Fields that are None (optional widths) are left to the caller. The
    defaults are read from the fields (not from a default instance: a config checks itself when built)."""
    problems = []
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        value = getattr(config, f.name)
        if value is None or default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            kind = "finite number" if isinstance(default, float) else type(default).__name__
            problems.append(f"{f.name} must be a {kind}, got {value!r}")
    return problems
