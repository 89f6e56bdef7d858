"""Durations as clients write them: seconds, or "1h30m"-style strings."""

import json
import math
import re

_UNITS_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}
# ASCII digits only, and nothing around them: " 1h" or an Arabic-Indic digit is a typo, not a duration.
_DURATION = re.compile("".join(f"(?:([0-9]+){unit})?" for unit in _UNITS_S))
# The same, for the OpenAPI document (a JSON Schema pattern is searched, not matched whole).
DURATION_PATTERN = f"^{_DURATION.pattern}$"


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "90s", "15m", "1h30m", "2d"; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError('a duration is a number of seconds or a string like "90s", "1h30m" or "2d"')
    try:
        if isinstance(value, int | float):
            seconds = float(value)
            if not math.isfinite(seconds):
                raise ValueError("a duration must be a finite number of seconds")
            return seconds
        if isinstance(value, str):
            match = _DURATION.fullmatch(value)
            if match and any(match.groups()):
                return float(
                    sum(int(n) * _UNITS_S[unit] for n, unit in zip(match.groups(), _UNITS_S, strict=True) if n)
                )
    except OverflowError:  # an integer, or a string's sum, past a float's range
        negative = isinstance(value, int) and value < 0
        raise ValueError("a duration cannot be negative" if negative else "a duration must be at most a year") from None
    raise ValueError(f'{_shown(value)} is not a duration: use seconds (90) or a string like "90s", "1h30m" or "2d"')


def _shown(value: object) -> str:
    """The value as the client wrote it in JSON, not as Python prints it."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)
