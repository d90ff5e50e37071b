"""What each bad input and fault produced, noted by the tests that try them, for the robustness
table (bench/robustness_table.py runs those tests with EDGE_PREATTN_ROBUSTNESS_LOG set). Without
that variable `record` does nothing."""

import json
import os


def record(group: str, case: str, outcome: str, count: int = 1) -> None:
    """One row: `count` cases of kind `case` (in `group`) ended in `outcome` (a message, or a summary)."""
    path = os.environ.get("EDGE_PREATTN_ROBUSTNESS_LOG")
    if path:
        with open(path, "a") as log:
            log.write(json.dumps({"group": group, "case": case, "outcome": outcome, "count": count}) + "\n")
