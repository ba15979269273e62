"""Settings' accepted values and number parsing, importable without torch: the command lines check a config with
them before torch and Lightning load."""

from __future__ import annotations

from ..conf.schema import choices

COMPILE_CHOICES = choices("compile")  # false, true or a torch.compile mode (COMPILE_MODES)


def parse_fraction(value: str | float) -> float:
    """0.0314, "0.0314" or "8/255" -> float (ε and step sizes are written as fractions of 255).

    Raises ValueError for anything else; callers turn it into their own error naming the field.
    """
    if isinstance(value, str) and "/" in value:
        num, _, den = value.replace(" ", "").partition("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError) as e:
            raise ValueError(f"{value!r} is not a number or a fraction like 8/255") from e
    return float(value)
