"""Argument checks shared by the config, the plan entries, calibration and the search.

Each check names the argument, the value with its type, and what to pass instead. Nothing is converted in a
way that loses information: 8.7 is not 8, "no" is not True, and a bool is not a number here. numpy integers
and floats are numbers like Python's.
"""

from __future__ import annotations

import math
import numbers

MAX_SEED = 2**63 - 1  # rotation seeds: torch.Generator.manual_seed takes 64-bit seeds; one bit kept for `+ index`
GENERATOR_SEEDS = (-(2**63), 2**64 - 1)  # the seeds torch.Generator.manual_seed takes (e.g. ComfyUI's up to 2^64-1)


def shown(value) -> str:
    """`8.7 (float)`: the value and its type, for error messages."""
    return f"{value!r} ({type(value).__name__})"


def integer(value, argument: str, *, allowed=None, minimum=None, maximum=None, fix: str = "") -> int:
    """`value` as a Python int: an integral number (a float only if it is a whole number), not a bool."""
    fix = f"; {fix}" if fix else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argument} must be an integer, got {shown(value)}{fix}.")
    if not isinstance(value, numbers.Integral):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"{argument} must be an integer, got {shown(value)}: it is not a whole number and "
                             f"is never rounded{fix}.")
    value = int(value)
    if allowed is not None and value not in allowed:
        choices = "{" + ", ".join(str(a) for a in allowed) + "}"
        raise ValueError(f"{argument} must be one of {choices}, got {value}{fix}.")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{argument} must be an integer {bounds}, got {value}{fix}.")
    return value


def real(value, argument: str, *, minimum=None, maximum=None, fix: str = "") -> float:
    """`value` as a finite Python float (ints allowed, bools and NaN / Inf not)."""
    fix = f"; {fix}" if fix else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argument} must be a number, got {shown(value)}{fix}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{argument} must be a finite number, got {value}{fix}.")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{argument} must be {bounds}, got {value}{fix}.")
    return value


def boolean(value, argument: str, fix: str = "") -> bool:
    """`value` as a bool: only True / False (numpy bools too), never the truth of a string or a number."""
    if type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{argument} must be True or False, got {shown(value)}{'; ' + fix if fix else ''}.")


def name_list(value, argument: str, example: str) -> list[str]:
    """A list of names from one name or an iterable of names (a string alone is one name, not its characters)."""
    if isinstance(value, str):
        names = [value]
    elif isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{argument} takes a name or a list of names (strings), got {shown(value)}; "
                        f"pass e.g. {argument}=[{example!r}].")
    else:
        names = list(value)
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"{argument} takes names (strings), got {bad[0]!r}; pass e.g. {argument}=[{example!r}].")
    if "" in names:
        raise ValueError(f"{argument} holds an empty name, which names nothing; pass e.g. {argument}=[{example!r}].")
    return names
