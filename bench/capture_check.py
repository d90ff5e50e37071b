"""The capture check as a result file: recomputed router top-k vs captured, for a trace folder.

    python bench/capture_check.py /tmp/traces-ref ../shared/models/moe-ref-a.gguf --per-layer 5000
Writes bench/results/capture-check-<model>.json.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from edge_preattn.files import write_json_atomic
from edge_preattn.traces import TraceSet, verify_capture


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("traces", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--per-layer", type=int, default=5000, help="tokens sampled per layer")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    traces = TraceSet(args.traces)
    check = verify_capture(traces, args.model, max_tokens_per_layer=args.per_layer)
    result = {
        "model": args.model.name,
        "fingerprint": traces.fingerprint,
        "command": " ".join(sys.argv),
        "tokens_in_traces": len(traces.meta()["tokens"]),
        **dataclasses.asdict(check),
        "match_rate": check.match_rate,
        "match_rate_ties_excepted": check.match_rate_ties_excepted,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"capture-check-{args.model.stem}.json", result)
    print(json.dumps(result, indent=2))
    return 0 if check.mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
