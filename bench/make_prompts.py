"""Prompts made from source and text files on this machine, for trace collection (issue 18).

../shared/prompts/train.txt holds 290 short prompts; code-heavy models route differently on real code
and prose, and many more tokens are needed than those prompts yield. This cuts files (Python stdlib
modules, licence and README texts, ...) into chunks of a few lines and writes them as JSONL prompts
(`{"text": ...}`, what `edge-preattn collect --prompts` reads).

Deterministic: files are taken in sorted order and each one's split is decided by the sha256 of its
path relative to its root, so the training and held-out files never overlap and a rerun (on the
same files) writes the same prompts. Held-out prompts come from other files than training prompts,
not only from other chunks of the same files.

    python bench/make_prompts.py /usr/lib/python3.11 /usr/share/common-licenses \
        --count 300 --split train -o /work/traces-pred/prompts-train.jsonl
    python bench/make_prompts.py /usr/lib/python3.11 /usr/share/common-licenses \
        --count 80 --split heldout -o /work/traces-pred/prompts-heldout.jsonl
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

SUFFIXES = (".py", ".md", ".rst", ".txt", "")
SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3"}


def heldout_file(relative: str, heldout_percent: int) -> bool:
    """Whether a file (by its path relative to its root) belongs to the held-out split."""
    return int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16) % 100 < heldout_percent


def source_files(roots: list[Path]) -> list[tuple[Path, str]]:
    """(path, path relative to its root) of every readable text file under the roots, sorted."""
    found = []
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            relative = path.name if root.is_file() else str(path.relative_to(root))
            if path.suffix in SUFFIXES and not SKIP_PARTS & set(Path(relative).parts):
                found.append((path, relative))
    return found


def chunks(text: str, lines_per_chunk: int, max_chars: int) -> list[str]:
    """Consecutive blocks of `lines_per_chunk` lines with some non-blank content, cut to max_chars."""
    lines = text.splitlines()
    blocks = ("\n".join(lines[i : i + lines_per_chunk]) for i in range(0, len(lines), lines_per_chunk))
    return [block[:max_chars] for block in blocks if len(block.strip()) > 40]


def make(args: argparse.Namespace) -> list[str]:
    prompts: list[str] = []
    for path, relative in source_files([Path(r) for r in args.roots]):
        if heldout_file(relative, args.heldout_percent) != (args.split == "heldout"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        prompts += chunks(text, args.lines, args.max_chars)[: args.per_file]
    if len(prompts) <= args.count:
        return prompts
    step = len(prompts) / args.count  # spread over all files rather than the first few
    return [prompts[int(i * step)] for i in range(args.count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", help="folders or files to cut into prompts")
    parser.add_argument("-o", "--output", required=True, help="JSONL file to write")
    parser.add_argument("--split", choices=("train", "heldout"), required=True)
    parser.add_argument("--count", type=int, default=300, help="prompts to write (at most)")
    parser.add_argument("--lines", type=int, default=24, help="lines per chunk")
    parser.add_argument("--max-chars", type=int, default=1200, help="characters per chunk at most")
    parser.add_argument("--per-file", type=int, default=2, help="chunks per file at most")
    parser.add_argument("--heldout-percent", type=int, default=20, help="share of files held out")
    args = parser.parse_args()
    prompts = make(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    print(f"wrote {len(prompts)} {args.split} prompts to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
