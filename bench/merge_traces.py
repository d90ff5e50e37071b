"""Join trace folders collected from the same model and the same prompts file (e.g. one pass with
long generations and one with other sampling seeds) into one folder that `edge-preattn train` reads.

The shards are linked (symlinks, no copy) and renumbered; every token keeps its prompt index, so the
split by prompt holds out every continuation of a held-out prompt in all the joined collections. The
joined manifest keeps the first folder's settings and lists every input's settings and totals under
"merged_from". Refused unless fingerprint, prompts file hash, layout and recorded layers all agree.

    python bench/merge_traces.py /tmp/traces-ref-big /tmp/traces-ref-p1 /tmp/traces-ref-p2
"""

import argparse
import json
import sys
from pathlib import Path

from edge_preattn.files import write_json_atomic
from edge_preattn.traces.trace_set import TraceSet

TOTALS = ("tokens", "prefill_tokens", "decode_tokens")


def merge(out_dir: Path, inputs: list[Path]) -> dict:
    sets = [TraceSet(path) for path in inputs]
    first = sets[0].manifest
    for traces in sets[1:]:
        for key in ("fingerprint", "prompts_sha256", "layout", "dtypes"):
            if traces.manifest.get(key) != first.get(key):
                raise SystemExit(f"{traces.directory} differs from {sets[0].directory} in {key}: not joined")
        if traces.manifest["settings"].get("layers") != first["settings"].get("layers"):
            raise SystemExit(f"{traces.directory} recorded other layers than {sets[0].directory}")
    out_dir.mkdir(parents=True, exist_ok=False)
    shards, merged_from = [], []
    for traces in sets:
        source = traces.directory.resolve()
        merged_from.append(
            {
                "folder": str(source),
                "settings": traces.manifest["settings"],
                "totals": traces.manifest.get("totals"),
            }
        )
        for shard in traces.manifest["shards"]:
            name = f"shard-{len(shards):05d}"
            (out_dir / name).symlink_to(source / shard["name"], target_is_directory=True)
            shards.append({**shard, "name": name, "source": f"{source}/{shard['name']}"})
    manifest = {
        **first,
        "shards": shards,
        "totals": {key: sum(shard[key] for shard in shards) for key in TOTALS},
        "merged_from": merged_from,
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", help="new folder (must not exist)")
    parser.add_argument("inputs", nargs="+", help="trace folders written by `edge-preattn collect`")
    args = parser.parse_args()
    manifest = merge(Path(args.output), [Path(path) for path in args.inputs])
    print(json.dumps(manifest["totals"]), f"in {len(manifest['shards'])} shards -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
