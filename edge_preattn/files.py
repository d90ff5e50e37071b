"""Writing results so that nothing half-written is ever left behind: temp name, then rename."""

import json
import os
from pathlib import Path
from typing import Any


def temporary_path(path: Path) -> Path:
    """A name beside `path` (same filesystem, so the rename is atomic) that readers ignore."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    temporary = temporary_path(path)
    try:
        temporary.write_bytes(data)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())
