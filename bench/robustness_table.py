"""The robustness table of issues #8 and #20: every bad input, fault and signal the tests try, how
many cases, and what each produced — the one-line message a user sees, or the fault's outcome and
warning, or how an interrupted command ended.

Runs the robustness tests with EDGE_PREATTN_ROBUSTNESS_LOG set (each test notes its cases through
tests/robustness_log.py), then writes bench/results/robustness.json and robustness.md. The table is
only as true as the tests that fed it: a failing test stops the script.

    python bench/robustness_table.py
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_preattn.files import write_json_atomic, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_bad_input.py",
    "tests/test_faults.py",
    "tests/test_interrupts.py",
    "tests/test_fuzz.py",
    "tests/test_layout.py::test_fuzzed_headers_read_or_refuse",
    "tests/test_predictors.py::test_fuzzed_manifests_end_in_a_clean_error_or_a_clean_load",
]


def collect_rows() -> list[dict]:
    with tempfile.TemporaryDirectory() as work:
        log = Path(work) / "robustness.jsonl"
        env = {**os.environ, "EDGE_PREATTN_ROBUSTNESS_LOG": str(log)}
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
            cwd=REPO,
            env=env,
            check=True,
        )
        return [json.loads(line) for line in log.read_text().splitlines()]


def merge(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by group; the same (case, outcome) noted by several tests (one per command) counted once
    per command that produced it."""
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        groups[row["group"]][(row["case"], row["outcome"])] += row["count"]
    return {
        group: [
            {"case": case, "outcome": outcome, "cases": count} for (case, outcome), count in counter.items()
        ]
        for group, counter in groups.items()
    }


def markdown(table: dict[str, list[dict]], meta: dict) -> str:
    total = sum(row["cases"] for rows in table.values() for row in rows)
    lines = [
        "# Robustness: bad input, faults and signals (issues #8, #20)",
        "",
        f"{total} cases in {len(table)} groups, from `python bench/robustness_table.py` at {meta['git']} "
        f"({meta['date']}). Every bad input exits with status 2 and one line (shown without the "
        "`edge-preattn: error: ` prefix) and writes nothing; every fault keeps stock llama.cpp's output; "
        "Ctrl-C ends with status 130 and one line, a closed stdout quietly with 141.",
        "",
        "| group | cases | distinct outcomes |",
        "|---|---:|---:|",
        *(
            f"| {group} | {sum(row['cases'] for row in rows)} | {len({row['outcome'] for row in rows})} |"
            for group, rows in table.items()
        ),
    ]
    for group, rows in table.items():
        cases = sum(row["cases"] for row in rows)
        lines += ["", f"## {group} ({cases} cases)", "", "| case | n | what it produced |", "|---|---:|---|"]
        for row in rows:
            outcome = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/", "…/", row["outcome"])  # the tests' tmp_path
            outcome = outcome.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {row['case']} | {row['cases']} | {outcome} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    started = time.monotonic()
    table = merge(collect_rows())
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    )
    meta = {
        "git": git.stdout.strip() or "unknown",
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "robustness.json", {**meta, "groups": table})
    write_text_atomic(args.out / "robustness.md", markdown(table, meta))
    print(f"wrote {args.out / 'robustness.md'}: {sum(len(rows) for rows in table.values())} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
