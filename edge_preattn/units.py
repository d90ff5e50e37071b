"""Sizes and rates with units, as users type them (`6GiB`, `12GB/s`) and as tables show them."""

import math
import os
import re
from typing import Any

from .errors import UserError

MIN_RATE_BYTES_PER_S = 1e6  # 1 MB/s: a slower modelled bus takes seconds per expert upload
MAX_THREADS_PER_CPU = 4

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
    """`12GB/s` → 12e9 bytes per second; at least MIN_RATE_BYTES_PER_S, since a rate is a modelled
    bus and `1B/s` would stall a run for hours on its first expert."""
    body = text.strip()
    rate = None
    try:
        if body.lower().endswith("/s"):
            rate = float(parse_bytes(body[:-2]))
    except UserError:
        pass
    if rate is None:
        raise UserError(
            f"cannot read rate {text!r}: write bytes per second above 0, such as 12GB/s or 800MiB/s"
        )
    if rate < MIN_RATE_BYTES_PER_S:
        raise UserError(f"rate {text!r} is below 1MB/s, the slowest bus this models: give 1MB/s or more")
    return rate


def max_threads() -> int:
    """The most CPU threads an option may ask for: a few per core (libgomp aborts on thousands)."""
    return MAX_THREADS_PER_CPU * (os.cpu_count() or 1)


def check_numeric_options(options: dict[str, Any]) -> None:
    """What every verb's parsed options must satisfy, checked in one place before any work: no NaN or
    infinity in a float option (argparse's float() accepts 'nan' and 'inf', and a NaN compares false
    with every range check after it), and a thread count llama.cpp and libgomp can start."""
    for name, value in options.items():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise UserError(f"--{name.replace('_', '-')} is {item}: give a finite number")
    threads = options.get("threads")
    if isinstance(threads, int) and not -1 <= threads <= max_threads():
        raise UserError(
            f"-t {threads} is outside 1..{max_threads()} ({MAX_THREADS_PER_CPU} per CPU core here); "
            "0 or -1 lets llama.cpp choose"
        )


def format_bytes(n_bytes: float) -> str:
    """Binary units, three significant digits: 1536 → '1.50 KiB'."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
