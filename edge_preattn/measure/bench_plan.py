"""What `bench` runs: the configurations (stock placements sized to a VRAM budget from the GGUF header,
the cache's modes with the slots `run --vram-budget` would give them) and the workload they share.
Split from bench.py, unchanged."""

from dataclasses import dataclass

from ..errors import UserError
from ..model.gguf_header import read_header
from ..model.layout import MoeLayout, estimate_compute_buffer_bytes, plan_slots
from ..runtime.options import MODES, PREDICTION_MODES

STOCK_CONFIGS = ("all-gpu", "exps-cpu", "n-cpu-moe", "ngl")
# "mode+cpu" / "mode+auto": that mode with `--miss cpu|auto` (missed experts computed on the CPU);
# "mode+token": with `--residency token` (residency decided between tokens, misses by the host side);
# "mode+gpu": that, with `--predictor-device gpu` (the predictor in the graph, the device prefetching);
# "mode+lead": "mode+gpu" with bench's --lead-predictors (trained with `train --lead`: each layer predicted
# from an earlier layer's activation, its uploads started that many layers ahead)
EDGE_CONFIGS = (
    *MODES[1:],
    "lru+cpu",
    "exact+cpu",
    "oracle+cpu",
    "lru+auto",
    "exact+auto",
    "lru+token",
    "top1+token",
    "exact+token",
    "oracle+token",
    "top1+gpu",
    "exact+gpu",
    "overprov+gpu",
    "top1+lead",
    "exact+lead",
    "overprov+lead",
)


def edge_mode(name: str) -> tuple[str, str, str, str]:
    """(run mode, miss policy, residency, predictor device) of an edge configuration name."""
    mode, _, variant = name.partition("+")
    if variant in ("token", "gpu", "lead"):
        return mode, "cpu", "token", "cpu" if variant == "token" else "gpu"
    return mode, variant or "upload", "routing", "cpu"


def reads_lead(name: str) -> bool:
    """Whether an edge configuration runs the --lead-predictors set instead of --predictors."""
    return name.endswith("+lead")


@dataclass(frozen=True)
class RunSpec:
    """One configuration as one worker process runs it; `key` names it across budgets and rounds."""

    key: str
    name: str  # one of STOCK_CONFIGS + EDGE_CONFIGS
    kind: str  # "stock" | "edge"
    placement: str  # what a reader needs to reproduce it
    estimated_vram_bytes: int
    n_gpu_layers: int = -1  # -1: all
    n_cpu_moe: int = 0  # routed experts of the first N blocks in host RAM (>= n_layer: all)
    slots: int = 0
    bandwidth_bytes_per_s: float | None = None


@dataclass(frozen=True)
class Workload:
    """What every configuration generates: same prompts, tokens, threads and context."""

    model: str
    prompts: tuple[str, ...]
    n_predict: int
    n_ctx: int
    threads: int
    predictors: str | None
    extra: int
    target: float
    bypass_tokens: int
    copy_queue: bool = False  # every cache configuration queues its prefetches on a copy stream
    lead_predictors: str | None = None  # the "+lead" configurations' set (train --lead)


# --- sizing stock placements from the header ---------------------------------------------------------


@dataclass(frozen=True)
class WeightBytes:
    block: tuple[int, ...]  # per block: every tensor of blk.N
    block_experts: tuple[int, ...]  # per block: its routed-expert tensors
    output: int  # output norm and head: on the GPU only when every block is


def weight_bytes(layout: MoeLayout) -> WeightBytes:
    """Bytes per block from the header (token_embd stays in host RAM, as llama.cpp keeps it)."""
    tensors = {t.name: t.n_bytes for t in read_header(layout.path).tensors}  # validated by read_layout
    block = [0] * layout.n_layer
    for name, n_bytes in tensors.items():
        if name.startswith("blk."):
            block[int(name.split(".")[1])] += n_bytes
    experts = [0] * layout.n_layer
    for layer in layout.moe_layers:
        experts[layer.index] = layer.bytes_per_expert * layer.n_expert
    output = sum(n for name, n in tensors.items() if name.startswith("output"))
    if "output.weight" not in tensors:  # tied embeddings: llama.cpp puts a copy of them on the GPU
        output += tensors.get("token_embd.weight", 0)
    return WeightBytes(tuple(block), tuple(experts), output)


def stock_vram_bytes(
    layout: MoeLayout, weights: WeightBytes, n_ctx: int, n_gpu_layers: int, n_cpu_moe: int
) -> int:
    """Planned VRAM of stock `-ngl n_gpu_layers --n-cpu-moe n_cpu_moe`: GPU blocks' weights (their
    experts only past the first n_cpu_moe blocks), their KV cache, the output head when every block is
    on the GPU, and plan_slots's compute-buffer estimate."""
    n_layer = layout.n_layer
    on_gpu = n_layer if n_gpu_layers < 0 else min(n_gpu_layers, n_layer)
    blocks = range(n_layer - on_gpu, n_layer)  # llama.cpp offloads the last blocks first
    total = sum(weights.block[i] - (weights.block_experts[i] if i < n_cpu_moe else 0) for i in blocks)
    if n_gpu_layers < 0 or n_gpu_layers > n_layer:
        total += weights.output
    total += layout.kv_cache_bytes(n_ctx) * on_gpu // n_layer
    return total + estimate_compute_buffer_bytes(layout, n_ctx)


def _stock_run(layout: MoeLayout, weights: WeightBytes, n_ctx: int, name: str, value: int = 0) -> RunSpec:
    """all-gpu, exps-cpu, n-cpu-moe=value or ngl=value as a run, with its planned VRAM."""
    n_layer = layout.n_layer
    ngl, n_cpu_moe, placement = {
        "all-gpu": (-1, 0, "every layer on the GPU"),
        "exps-cpu": (-1, n_layer, "-ot exps=CPU"),
        "n-cpu-moe": (-1, value, f"--n-cpu-moe {value}"),
        "ngl": (value, 0, f"-ngl {value}"),
    }[name]
    key = name if name in ("all-gpu", "exps-cpu") else f"{name}={value}"
    vram = stock_vram_bytes(layout, weights, n_ctx, ngl, n_cpu_moe)
    return RunSpec(key, name, "stock", placement, vram, n_gpu_layers=ngl, n_cpu_moe=n_cpu_moe)


def _stock_runs_at(
    layout: MoeLayout, weights: WeightBytes, n_ctx: int, budget: int, names: list[str], *, notes: list[str]
) -> list[RunSpec]:
    """The stock configurations of a GPU build sized to `budget`: exps-cpu, the smallest --n-cpu-moe
    that fits and the largest -ngl that fits (none when it would be all-gpu or nothing fits)."""
    n_layer, found = layout.n_layer, []
    if "exps-cpu" in names:
        found.append(_stock_run(layout, weights, n_ctx, "exps-cpu"))
    if "n-cpu-moe" in names:
        fitting = [n for n in range(n_layer + 1) if stock_vram_bytes(layout, weights, n_ctx, -1, n) <= budget]
        if not fitting:
            notes.append("--n-cpu-moe: even every expert in RAM exceeds the budget; not run")
        elif fitting[0] == 0:
            notes.append("--n-cpu-moe 0 fits, which is all-gpu")
        else:
            found.append(_stock_run(layout, weights, n_ctx, "n-cpu-moe", fitting[0]))
    if "ngl" in names:
        fitting = [n for n in range(n_layer + 2) if stock_vram_bytes(layout, weights, n_ctx, n, 0) <= budget]
        if not fitting:
            notes.append("-ngl: not even the compute buffer fits the budget; not run")
        elif fitting[-1] > n_layer:
            notes.append("-ngl: every layer fits, which is all-gpu")
        else:
            found.append(_stock_run(layout, weights, n_ctx, "ngl", fitting[-1]))
    return found


def _edge_placement(name: str, slots: int) -> str:
    mode, miss, residency, device = edge_mode(name)
    if residency == "token":
        on_gpu = " --predictor-device gpu" if device == "gpu" else ""
        lead = " with the --lead-predictors set" if reads_lead(name) else ""
        return f"--mode {mode} --slots {slots} --residency token{on_gpu}{lead}"
    return f"--mode {mode} --slots {slots} --miss {miss}"


def _edge_run(layout: MoeLayout, name: str, plan, bandwidth: float | None) -> RunSpec:
    cap = f" --bandwidth {bandwidth / 1e9:g}GB/s" if bandwidth else ""
    return RunSpec(
        f"{name}:slots={plan.slots_per_layer}" + (f":bw={bandwidth / 1e9:g}GBps" if bandwidth else ""),
        name,
        "edge",
        _edge_placement(name, plan.slots_per_layer) + cap,
        plan.non_expert_bytes + plan.kv_cache_bytes + plan.compute_buffer_bytes + plan.expert_cache_bytes,
        n_cpu_moe=layout.n_layer,
        slots=plan.slots_per_layer,
        bandwidth_bytes_per_s=bandwidth,
    )


def plan_runs(
    layout: MoeLayout,
    budgets: list[int],
    bandwidths: list[float | None],
    names: list[str],
    *,
    gpu: bool,
    n_ctx: int,
    has_predictors: bool,
    has_lead_predictors: bool = False,
) -> tuple[dict[str, RunSpec], dict[tuple[int, float | None], list[str]], dict[int, list[str]], str]:
    """(runs by key, keys of each (budget, bandwidth) table, notes per budget, the reference's key).

    The reference (all-gpu; exps-cpu on a CPU-only build, where the GPU placements are all the same
    one) is in every table. Runs shared by several tables appear once.
    """
    weights = weight_bytes(layout)
    reference = _stock_run(layout, weights, n_ctx, "all-gpu" if gpu else "exps-cpu")
    runs = {reference.key: reference}
    tables: dict[tuple[int, float | None], list[str]] = {}
    notes: dict[int, list[str]] = {}
    edge_names = [name for name in EDGE_CONFIGS if name in names]
    predicting = [name for name in edge_names if edge_mode(name)[0] in PREDICTION_MODES]
    skipped = [
        name for name in predicting if not (has_lead_predictors if reads_lead(name) else has_predictors)
    ]
    edge_names = [name for name in edge_names if name not in skipped]
    for budget in budgets:
        said = notes.setdefault(budget, [])
        if not gpu:
            said.append(
                "CPU-only build: all-gpu, --n-cpu-moe and -ngl put every weight in host RAM like "
                "-ot exps=CPU, so the one stock configuration run is exps-cpu"
            )
            stock = []
        else:
            if reference.estimated_vram_bytes > budget:
                said.append("all-gpu does not fit: run as the token reference and marked over budget")
            stock = _stock_runs_at(layout, weights, n_ctx, budget, names, notes=said)
        if skipped:
            said.append(f"no --predictors or --lead-predictors: {', '.join(skipped)} not run")
        try:
            plan = plan_slots(layout, budget, n_ctx)
        except UserError as error:
            said.append(f"edge-preattn: {error}")
            plan = None
        for bandwidth in bandwidths:
            edge = [_edge_run(layout, name, plan, bandwidth) for name in edge_names] if plan else []
            for spec in [reference, *stock, *edge]:
                runs.setdefault(spec.key, spec)
            tables[(budget, bandwidth)] = [spec.key for spec in [reference, *stock, *edge]]
    return runs, tables, notes, reference.key
