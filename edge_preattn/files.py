"""Every file this package writes goes through `atomic_output`: nothing half-written is ever left
behind (temp name, then rename), and nothing that is not a regular file is ever replaced.

The rename that makes writes atomic would also replace a device, a FIFO or a socket named as an
output (`--stats-json /dev/null` run as root would turn the system's /dev/null into a file), so
outputs are checked first; a full disk or a read-only folder ends in one line, the temp file gone.
Inputs are checked the other way round by `regular_input`: a FIFO opened for reading blocks forever.
"""

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

_KINDS = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a FIFO (named pipe)",
    stat.S_ISSOCK: "a socket",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
}


def file_kind(mode: int) -> str:
    """What an `st_mode` that is not a regular file is, in words ('a FIFO (named pipe)')."""
    return next((name for test, name in _KINDS.items() if test(mode)), "not a regular file")


def what_is(path: Path) -> str:
    """What stands at `path` in words, for messages: 'a file', 'a directory', 'a FIFO (named pipe)'."""
    mode = os.stat(path).st_mode
    return "a file" if stat.S_ISREG(mode) else file_kind(mode)


def temporary_path(path: Path) -> Path:
    """A name beside `path` (same filesystem, so the rename is atomic) that readers ignore."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def write_errors_as_user_errors(path: Path) -> Iterator[None]:
    """An OSError while writing `path` (a full disk, a read-only folder) becomes one line saying
    what happened and what to do; the caller's cleanup runs as the error passes through."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"cannot write {path}: {reason} (disk full); free some space and rerun") from None
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"cannot write {path}: {reason}; choose a folder you can write to") from None
        raise UserError(f"cannot write {path}: {reason}") from None


def output_target(path: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """The file `path` names (through a link), refused with one line unless it is a regular file or
    does not exist yet in an existing folder, and is none of the command's `inputs` (`inspect m.gguf
    --json m.gguf` replaced the model with its own layout)."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path  # a loop: os.stat says so
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as error:  # a link loop, a name too long, a folder we cannot search
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise UserError(f"refusing to write {path}: it is {file_kind(mode)}, not a regular file; name a file")
    for source in inputs:
        if mode is not None and os.path.exists(source) and os.path.samefile(target, source):
            raise UserError(f"refusing to write {path}: it is the input {source}; name another file")
    if not target.parent.is_dir():
        missing = "is not a folder" if target.parent.exists() else "does not exist"
        raise UserError(f"cannot write {path}: its folder {target.parent} {missing}")
    if not os.access(target.parent, os.W_OK):  # a read-only disk too: refused before the work
        raise UserError(f"cannot write {path}: its folder {target.parent} is read-only to you")
    return target


def output_folder(path: Path) -> Path:
    """Make the output folder `path` (and its parents); a file, a link loop or a read-only parent in
    the way is refused with one line instead of mkdir's traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"cannot make the folder {path}: something that is not a folder is there") from None
    except OSError as error:
        raise UserError(f"cannot make the folder {path}: {error.strerror or error}") from None
    return path


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write `path`'s new content to; renames it over `path` when the
    block ends without an error, removes it otherwise. OSError (disk full, read-only) → UserError."""
    target = output_target(path)
    temporary = temporary_path(target)
    try:
        with write_errors_as_user_errors(path):
            yield temporary
            temporary.replace(target)
    finally:
        with contextlib.suppress(OSError):  # never there, or on a read-only disk
            temporary.unlink()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_output(path) as temporary:
        temporary.write_bytes(data)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def regular_input(path: Path, what: str) -> Path:
    """`path` if it is a regular file (through links); else one line saying what it is instead."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found") from None
    except OSError as error:
        raise UserError(f"cannot read {what} {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {path} is {file_kind(mode)}, not a regular file")
    return path
