"""How robustdiff writes an accuracy in the console, tables and model cards: one rule for every output."""

from __future__ import annotations

import math


def format_pct(value: float | None, digits: int = 2, missing: str | None = "—", sign: bool = False,
               scale: float = 100) -> str | None:
    """An accuracy given as a fraction, in percent: 0.6335 -> '63.35' ('63.35%' with ``sign``); None or NaN ->
    ``missing``. ``scale=1`` for a value already in percent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return f"{scale * value:.{digits}f}{'%' if sign else ''}"


def percent(value: float | None, scale: float = 100) -> str:
    """The console's accuracy: 0.6335 -> '63.35%'; None or NaN -> '—'."""
    return format_pct(value, sign=True, scale=scale)
