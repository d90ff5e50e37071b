"""The `edge-preattn` command: it only dispatches to the module of each verb.

Every verb module defines `HELP` (one line), `EXAMPLES` (shown under its --help), `add_args(parser)`
and `main(args) -> int` (and `RESUMABLE = True` where an interrupted run keeps its work for a rerun).
Heavy imports (llama_cpp, torch) stay inside those functions so that `edge-preattn --help` is instant.
"""

import argparse
import copy
import errno
import importlib
import logging
import os
import signal
import sys

from . import __version__
from .errors import UserError
from .interrupts import deferred
from .units import check_numeric_options

# verb -> module, in data-flow order
VERBS = {
    "build": "edge_preattn.model.build",
    "inspect": "edge_preattn.model.layout",
    "synth": "edge_preattn.model.synth",
    "collect": "edge_preattn.traces.collect",
    "train": "edge_preattn.predictors.train",
    "eval": "edge_preattn.predictors.evaluate",
    "run": "edge_preattn.runtime.run",
    "serve": "edge_preattn.runtime.serve",
    "bench": "edge_preattn.measure.bench",
    "profile": "edge_preattn.measure.profile",
}


# modules of an optional extra (pyproject.toml) -> that extra
EXTRA_MODULES = {"torch": "train", "onnx": "train", "matplotlib": "train"}


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end in one line naming the fix, like every other error (argparse prints two)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their lines, and every option with a default value shows it (unless its help
    already says what the default is), so --help answers "what happens if I leave this out"."""

    def _format_action(self, action: argparse.Action) -> str:
        default, text = action.default, action.help or ""
        unset = default is None or default is False or default in ([], argparse.SUPPRESS)
        if action.option_strings and not unset and text != argparse.SUPPRESS and "default" not in text:
            action = copy.copy(action)  # the parser's own action keeps its help
            action.help = f"{text} (default %(default)s)".lstrip()
        return super()._format_action(action)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with `only` one verb's (so one verb's imports cannot break another's)."""
    parser = OneLineParser(
        prog="edge-preattn",
        description="Run MoE GGUF models larger than VRAM in llama.cpp, with experts predicted "
        "from the pre-attention activation and prefetched into a GPU slot cache.",
    )
    parser.add_argument("--version", action="version", version=f"edge-preattn {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    for verb, module_name in VERBS.items():
        if only is not None and verb != only:
            continue
        module = importlib.import_module(module_name)
        verb_parser = sub.add_parser(
            verb,
            help=module.HELP,
            description=module.HELP,
            epilog="examples:\n" + module.EXAMPLES,
            formatter_class=HelpFormatter,
        )
        verb_parser.add_argument("--verbose", action="store_true", help="log details (llama.cpp's too)")
        module.add_args(verb_parser)
        verb_parser.set_defaults(_module=module)
    return parser


def configure_logging(verbose: bool) -> None:
    """Our own progress notes (INFO) as plain lines; everything else, llama.cpp's log included, only
    from WARNING up unless --verbose."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    ours = logging.getLogger("edge_preattn")
    if not verbose and not ours.handlers:
        for handler in logging.root.handlers:
            handler.setLevel(logging.WARNING)  # our INFO lines go only through the plain handler below
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.setLevel(logging.INFO)
        handler.addFilter(lambda record: record.levelno == logging.INFO)
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)


EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a tool that SIGPIPE stopped (`| head`)


def quiet_stdout() -> None:
    """The reader of stdout has gone (`edge-preattn run | head -c 20`): send what is still buffered,
    and everything after it, to /dev/null, so that neither this exit nor the interpreter's final
    flush prints a BrokenPipeError traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (under pytest): nothing to flush
        pass
    finally:
        os.close(devnull)


def reopen_closed_std_streams() -> None:
    """`edge-preattn run >&-`: a closed stdin, stdout or stderr becomes /dev/null. Otherwise the next
    file opened takes its descriptor, so that whatever llama.cpp prints goes into that file, and
    Python's sys.stdout is None, which `run` cannot write to."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: fd itself
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


def check_text_options(options: dict) -> None:
    """Arguments that are not UTF-8 reach Python as lone surrogates, which llama.cpp's tokenizer and
    file names cannot take (a traceback in `str.encode`): refused in one line."""
    for name, value in options.items():
        for item in value if isinstance(value, list) else (value,):
            if isinstance(item, str) and not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    shown = name.replace("_", " ")
                    raise UserError(f"the {shown} {item!r} is not UTF-8 text: pass it as UTF-8") from None


EXIT_TERMINATED = 128 + signal.SIGTERM


def terminate_like_ctrl_c(terminated: list[int]):
    """A SIGTERM handler (`timeout`, `kill`, a job scheduler) that stops the way Ctrl-C does: it raises
    KeyboardInterrupt, held like Ctrl-C's until native calls finish their token or batch
    (interrupts.py), so the verb unwinds and keeps its work; main() then exits 143 instead of 130.
    It raises itself rather than send SIGINT, which a script's background job ignores."""

    def handler(signum: int, _frame) -> None:
        terminated.append(signum)
        raise KeyboardInterrupt

    return handler


def main(argv: list[str] | None = None) -> int:
    terminated: list[int] = []
    if argv is None and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # the program, not a caller
        signal.signal(signal.SIGTERM, terminate_like_ctrl_c(terminated))
    argv = sys.argv[1:] if argv is None else argv
    reopen_closed_std_streams()
    verb = next((word for word in argv if not word.startswith("-")), None)
    module = None
    try:
        with deferred():  # Ctrl-C: after the verb's imports (numpy's init turns one into an ImportError)
            parser = build_parser(verb if verb in VERBS else None)
        args = parser.parse_args(argv)  # sizes/rates parse here
        check_numeric_options(vars(args))
        check_text_options(vars(args))
        configure_logging(args.verbose)
        module = args._module
        return int(module.main(args) or 0)
    except UserError as error:
        print(f"edge-preattn: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        extra = EXTRA_MODULES.get((error.name or "").partition(".")[0])
        if extra is None:
            raise
        print(
            f"edge-preattn: error: {verb} needs {error.name}, which is not installed: run "
            f"pip install -e '.[{extra}]' in the repository (CPU-only torch: see the README's "
            '"Training your own predictors")',
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        # CPython marks the process when a KeyboardInterrupt leaves code that eval() or exec() ran from a
        # string (how dataclasses and namedtuples are made, often inside an import) and, under
        # `python -m`, kills itself with SIGINT at exit although the interrupt was handled here: status
        # -2 instead of 130 or 143. A string eval that ends normally clears the mark.
        eval("None")
        # verbs that keep partial work (RESUMABLE = True) pick up where they stopped
        resume = "; rerun the same command to resume" if getattr(module, "RESUMABLE", False) else ""
        print(f"\nedge-preattn: {'terminated' if terminated else 'interrupted'}{resume}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else 130
    except BrokenPipeError:
        quiet_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as error:  # files are written through files.py (UserError): this is stdout (>/dev/full)
        if error.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
            raise
        quiet_stdout()
        print(f"edge-preattn: error: cannot write the output: {error.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
