"""Sizes and rates with units, as users type them (`6GiB`, `12GB/s`) and as tables show them."""

import re

from .errors import UserError

_MULTIPLIERS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """`6GiB` → 6442450944; `12GB` → 12e9; a bare number is bytes."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _MULTIPLIERS:
        raise UserError(f"cannot read size {text!r}: write a number with a unit such as 512MiB, 6GiB or 12GB")
    value = float(match.group(1)) * _MULTIPLIERS[unit]
    if value <= 0:
        raise UserError(f"size {text!r} must be positive: write a size such as 512MiB or 6GiB")
    return int(value)


def parse_rate(text: str) -> float:
    """`12GB/s` → 12e9 bytes per second."""
    body = text.strip()
    try:
        if body.lower().endswith("/s"):
            return float(parse_bytes(body[:-2]))
    except UserError:
        pass
    raise UserError(f"cannot read rate {text!r}: write bytes per second above 0, such as 12GB/s or 800MiB/s")


def format_bytes(n_bytes: float) -> str:
    """Binary units, three significant digits: 1536 → '1.50 KiB'."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
