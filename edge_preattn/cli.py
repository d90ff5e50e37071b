"""The `edge-preattn` command: it only dispatches to the module of each verb.

Every verb module defines `HELP` (one line), `EXAMPLES` (shown under its --help), `add_args(parser)`
and `main(args) -> int` (and `RESUMABLE = True` where an interrupted run keeps its work for a rerun).
Heavy imports (llama_cpp, torch) stay inside those functions so that `edge-preattn --help` is instant.
"""

import argparse
import copy
import importlib
import logging
import sys

from . import __version__
from .errors import UserError

# verb -> module, in data-flow order
VERBS = {
    "build": "edge_preattn.build",
    "inspect": "edge_preattn.layout",
    "synth": "edge_preattn.synth",
    "collect": "edge_preattn.collect",
    "train": "edge_preattn.train",
    "eval": "edge_preattn.evaluate",
    "run": "edge_preattn.run",
    "serve": "edge_preattn.serve",
    "bench": "edge_preattn.bench",
    "profile": "edge_preattn.profile",
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = next((word for word in argv if not word.startswith("-")), None)
    module = None
    try:
        args = build_parser(verb if verb in VERBS else None).parse_args(argv)  # sizes/rates parse here
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
        # verbs that keep partial work (RESUMABLE = True) pick up where they stopped
        resume = "; rerun the same command to resume" if getattr(module, "RESUMABLE", False) else ""
        print(f"edge-preattn: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
