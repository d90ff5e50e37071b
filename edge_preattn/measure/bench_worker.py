"""One `bench` configuration in its own process (`python -m edge_preattn.measure.bench_worker JOB.json
OUT.json`): llama-cpp-python binds one library per process and VRAM is read per process. Split from
bench.py, unchanged."""

import contextlib
import json
import sys
import time
from pathlib import Path

from ..errors import UserError
from ..files import write_json_atomic
from ..model import native
from ..model.layout import read_layout
from ..runtime.options import PREDICTION_MODES, CacheOptions
from .bench_plan import RunSpec, Workload, edge_mode, reads_lead


def _merged(records):
    """One Generation over every prompt: run_stats then reads the whole workload."""
    from ..model.engine import Generation

    return Generation(
        prompt_tokens=[t for r in records for t in r.prompt_tokens],
        tokens=[t for r in records for t in r.tokens],
        prefill_seconds=sum(r.prefill_seconds for r in records),
        decode_seconds=[s for r in records for s in r.decode_seconds],
    )


def record_oracle(engine, prompts: tuple[str, ...], n_predict: int, sampling) -> dict:
    """The routing of every prompt in turn, ubatches numbered as one runtime will count them."""
    from ..runtime.cache_runtime import record_routing

    merged, offset = {}, 0
    for prompt in prompts:
        routing = record_routing(engine, prompt, n_predict, sampling)
        merged.update({(ubatch + offset, il): ids for (ubatch, il), ids in routing.items()})
        offset += 1 + max((ubatch for ubatch, _ in routing), default=-1)
    return merged


def run_config(spec: RunSpec, work: Workload) -> dict:
    """Generate the workload in this process with the library EDGE_PREATTN_LIB names."""
    from ..model.engine import Engine, EngineConfig, Sampling, complete, expert_overrides
    from ..runtime.cache_runtime import CacheRuntime
    from ..runtime.stats import run_stats
    from .machine import VramProbe

    probe = VramProbe.start()
    # (with misses on the CPU, the CPU side's expert matmuls must stay on the CPU)
    offload = spec.kind == "edge" and edge_mode(spec.name)[1] == "upload"
    llama_cpp = native.load_llama(native.find_library(), offload_short_batches=offload)
    layout = read_layout(work.model)
    if spec.n_cpu_moe >= layout.n_layer:
        overrides = expert_overrides(None)
    else:
        overrides = expert_overrides(spec.n_cpu_moe) if spec.n_cpu_moe else ()
    config = EngineConfig(
        work.model,
        n_ctx=work.n_ctx,
        n_threads=work.threads,
        n_gpu_layers=spec.n_gpu_layers,
        overrides=overrides,
        use_extra_bufts=spec.kind == "stock",  # the cache reads experts as the file's plain bytes
    )
    sampling = Sampling(temperature=0.0)  # greedy: every configuration must give stock's tokens
    started = time.perf_counter()
    with Engine(llama_cpp, config) as engine, contextlib.ExitStack() as stack:
        load_s = time.perf_counter() - started
        complete(engine, work.prompts[0], min(4, work.n_predict), sampling)  # warm-up
        runtime = None
        if spec.kind == "edge":
            predictors = None
            mode, miss, residency, predictor_device = edge_mode(spec.name)
            if mode in PREDICTION_MODES:
                from ..predictors.onnx_io import load_predictor_set

                chosen = work.lead_predictors if reads_lead(spec.name) else work.predictors
                predictors = load_predictor_set(Path(chosen), fingerprint=layout.routing_fingerprint)
            oracle = (
                record_oracle(engine, work.prompts, work.n_predict, sampling) if mode == "oracle" else None
            )
            runtime = stack.enter_context(
                CacheRuntime.for_layout(
                    engine,
                    layout,
                    CacheOptions(
                        mode=mode,
                        n_slots=spec.slots,
                        miss=miss,
                        max_batch_tokens=work.bypass_tokens,
                        predictors=predictors,
                        extra=work.extra,
                        target=work.target,
                        bandwidth_bytes_per_s=spec.bandwidth_bytes_per_s,
                        oracle=oracle,
                        copy_queue=work.copy_queue,
                        residency=residency,
                        predictor_device=predictor_device,
                    ),
                )
            )
        records = [complete(engine, prompt, work.n_predict, sampling) for prompt in work.prompts]
        merged = _merged(records)
        stats = run_stats(merged, engine, runtime)
        vram_bytes, vram_source = probe.read()
        build_info = engine.api.build_info()
    return {
        "tokens": [r.tokens for r in records],
        "decode_ms": [round(s * 1e3, 4) for s in merged.decode_seconds],
        "prefill_tok_s": merged.prefill_tok_s,
        "decode_tok_s": merged.decode_tok_s,
        "stats": stats,
        "vram_bytes": vram_bytes,
        "vram_source": vram_source,
        "load_s": round(load_s, 3),
        "build": build_info,
    }


def worker_main(argv: list[str]) -> int:
    """`python -m edge_preattn.measure.bench_worker JOB.json OUT.json`: what bench runs per process."""
    job = json.loads(Path(argv[0]).read_text())
    if job["task"] == "bandwidth":
        from .transfers import measure_bandwidth

        api = native.NativeApi(native.load_llama(native.find_library()))
        result = {"gpu": bool(api.gpus())}
        try:  # without it the bench still runs, only the physical limits are left out
            result.update(measure_bandwidth(api))
        except (UserError, RuntimeError, OSError, ValueError) as error:
            result["error"] = repr(error)
    else:
        result = run_config(RunSpec(**job["spec"]), Workload(**job["workload"]))
    write_json_atomic(Path(argv[1]), result)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
