"""Predictors as files: ONNX export (with a check that onnxruntime computes what torch computed),
optional int8 dynamic quantization, the `predictors.json` manifest, and CPU sessions for the runtime.

Only export needs torch; loading needs onnxruntime alone. Loading trusts nothing it reads: the
manifest must name this model, every file must stay inside the folder and match its sha256, and the
graph's shapes must agree with the manifest.
"""

import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import atomic_output, write_json_atomic
from ..interrupts import deferred
from .features import input_name

FORMAT = "edge-preattn-predictors/1"
MANIFEST = "predictors.json"
OPSET = 17
CHECK_TOLERANCE = 1e-4  # max |onnxruntime − torch| accepted at export
CHECK_ROWS = 4096


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def session_options(threads: int = 1):
    """intra-op threads as given, sequential execution, all graph optimizations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _session(model: bytes | str, threads: int = 1):
    import onnxruntime as ort

    return ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])


def _feeds(x: np.ndarray, extra: dict | None) -> dict:
    feeds = {"x": x, **(extra or {})}
    return {name: np.ascontiguousarray(a, np.float32) for name, a in feeds.items()}


def onnx_scores(path: Path, x: np.ndarray, threads: int = 1, extra: dict | None = None) -> np.ndarray:
    """Run one ONNX predictor file on x [N, d] (and its history inputs, {name: [N, E]}) → scores [N, E]."""
    return _session(str(path), threads).run(["scores"], _feeds(x, extra))[0]


def export_layer(model, out_dir: Path, il: int, x_check: np.ndarray, extra_check: dict | None = None) -> dict:
    """Write `layer-NNN.onnx` (inputs x [N, d] and one input per history feature, named as in
    `extra_check`; output scores [N, E]; N dynamic) from a torch model in eval mode, check onnxruntime
    against torch on x_check (real validation rows), return its entry.

    The graph stays a plain chain the native engine can read back: (x − mean) / std, MatMul + Add,
    activation, MatMul + Add, and with a router prior one more MatMul, a Mul by its scale and an Add."""
    import torch

    model = model.eval()
    extra_check = extra_check or {}
    names = list(extra_check)
    path = Path(out_dir) / f"layer-{il:03d}.onnx"
    dummy = (torch.zeros(2, model.n_embd), *(torch.zeros(2, a.shape[1]) for a in extra_check.values()))
    with atomic_output(path) as temporary, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter: the dynamo one needs onnxscript
        torch.onnx.export(
            model,
            dummy,
            str(temporary),
            dynamo=False,
            input_names=["x", *names],
            output_names=["scores"],
            dynamic_axes={name: {0: "n_tokens"} for name in ["x", *names, "scores"]},
            opset_version=OPSET,
        )
    rows = {"x": x_check[:CHECK_ROWS], **{n: a[:CHECK_ROWS] for n, a in extra_check.items()}}
    rows = {name: np.ascontiguousarray(a, np.float32) for name, a in rows.items()}  # [n, ·] each
    with torch.no_grad():
        expected = model(*(torch.from_numpy(a) for a in rows.values())).numpy()  # [n, E]
    found = _session(str(path)).run(["scores"], rows)[0] if len(rows["x"]) else expected
    difference = float(np.abs(found - expected).max()) if len(rows["x"]) else 0.0
    if not difference < CHECK_TOLERANCE:
        raise RuntimeError(
            f"{path}: onnxruntime differs from torch by {difference:.2e} (> {CHECK_TOLERANCE})"
        )
    return {
        "layer": il,
        "file": path.name,
        "sha256": sha256_bytes(path.read_bytes()),
        "bytes": path.stat().st_size,
        "parameters": model.parameter_count(),
        "export_check": {"rows": len(rows["x"]), "max_abs_diff": difference, "tolerance": CHECK_TOLERANCE},
    }


def fp16_layer(out_dir: Path, il: int) -> dict:
    """Write `layer-NNN.fp16.onnx`: every float32 weight stored as float16 and cast back to float32
    where it is used (one Cast per weight), so inputs, outputs and the arithmetic stay float32 and
    any runtime reads it; the file (and the weights a GPU would hold) is half the size."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    source = Path(out_dir) / f"layer-{il:03d}.onnx"
    path = source.with_name(f"layer-{il:03d}.fp16.onnx")
    graph_model = onnx.load(str(source))
    graph = graph_model.graph
    casts = []
    for position, initializer in enumerate(list(graph.initializer)):
        if initializer.data_type != TensorProto.FLOAT:
            continue
        name = initializer.name
        half = numpy_helper.from_array(numpy_helper.to_array(initializer).astype(np.float16), name + "_fp16")
        graph.initializer[position].CopyFrom(half)
        casts.append(helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    with atomic_output(path) as temporary:
        onnx.save(graph_model, str(temporary))
    return {"file": path.name, "sha256": sha256_bytes(path.read_bytes()), "bytes": path.stat().st_size}


def quantize_layer(out_dir: Path, il: int) -> dict:
    """Write `layer-NNN.int8.onnx`: int8 weights, activations quantized on the fly (dynamic).

    The router prior's MatMul stays float: it reads the raw pre-attention state, whose few large
    features (the norm weights') set a per-tensor activation scale that rounds every other feature
    away — quantized, the prior's ranking collapsed (layer 0 of moe-ref-a: recall@8 0.77 → 0.15)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = Path(out_dir) / f"layer-{il:03d}.onnx"
    path = source.with_name(f"layer-{il:03d}.int8.onnx")
    prior_nodes = [node.name for node in onnx.load(str(source)).graph.node if "prior" in node.input]
    logging.disable(logging.WARNING)  # its root-logger advice to pre-process, on every call
    try:
        with atomic_output(path) as temporary:  # the prior's MatMul stays float: int8 collapsed it
            quantize_dynamic(source, temporary, weight_type=QuantType.QInt8, nodes_to_exclude=prior_nodes)
    finally:
        logging.disable(logging.NOTSET)
    return {"file": path.name, "sha256": sha256_bytes(path.read_bytes()), "bytes": path.stat().st_size}


def write_manifest(out_dir: Path, fields: dict) -> None:
    write_json_atomic(Path(out_dir) / MANIFEST, {"format": FORMAT, **fields})


class PredictorSet:
    """ONNX predictors of one model, loaded for CPU inference."""

    def __init__(
        self, directory: Path, manifest: dict, sessions: dict, int8: bool, fp16: bool = False
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self._sessions = sessions
        self.layers: tuple[int, ...] = tuple(sorted(sessions))
        self.k: int = manifest["k"]
        self.n_expert: int = manifest["n_expert"]
        self.n_embd: int = manifest["n_embd"]
        self.input: str = manifest["input"]
        self.lead: int = manifest.get("lead", 0)  # train --lead: each layer read from an earlier one
        # {layer: the layer whose pre-attention state its predictor reads}: itself but with a lead
        self.sources: dict[int, int] = {
            entry["layer"]: entry.get("source_layer", entry["layer"]) for entry in manifest["predictors"]
        }
        self.features: tuple[str, ...] = tuple(manifest.get("features") or ())
        self.fingerprint: str = manifest["fingerprint"]
        self.int8, self.fp16 = int8, fp16  # which of the files was loaded (fp32 when neither)

    def check_fits(self, layout) -> None:
        """Refuse a set whose shapes or layers are not the model's: a manifest can carry the right
        fingerprint and still hold another model's graphs (edited by hand, or files mixed up)."""
        moe_layers = {layer.index for layer in layout.moe_layers}
        same_shape = (self.n_embd, self.n_expert) == (layout.n_embd, layout.n_expert)
        if not same_shape or not set(self.layers) <= moe_layers:
            raise UserError(
                f"{self.directory} holds predictors for d = {self.n_embd}, E = {self.n_expert}, layers "
                f"{list(self.layers)}, but {Path(layout.path).name} has d = {layout.n_embd}, "
                f"E = {layout.n_expert}, MoE layers {sorted(moe_layers)}: train predictors for this model"
            )

    def scores(self, il: int, x: np.ndarray, extra: dict | None = None) -> np.ndarray:
        """x [N, d] float32 (and, for a set trained with history features, `extra` {ONNX input name:
        [N, E]}) → scores [N, E] float32; rank them for the predicted experts."""
        if il not in self._sessions:
            raise KeyError(f"no predictor for layer {il}: this set covers layers {list(self.layers)}")
        if x.ndim != 2 or x.shape[1] != self.n_embd:
            raise ValueError(f"x must be [N, {self.n_embd}], not {list(x.shape)}")
        if self.features and not extra:
            raise UserError(
                f"{self.directory} reads history inputs ({', '.join(self.features)}) that only the "
                "library's own predictor feeds: run with --predictor-engine native (the default), or train "
                "without --features"
            )
        return self._sessions[il].run(["scores"], _feeds(x, extra))[0]


# ONNX protobuf field numbers (onnx.proto3) on the way from a model to every tensor it holds
_MODEL_GRAPH, _MODEL_FUNCTIONS, _FUNCTION_NODES = 7, 25, 7
_GRAPH_NODES, _GRAPH_INITIALIZERS, _GRAPH_SPARSE_INITIALIZERS = 1, 5, 15
_NODE_ATTRIBUTES = 5
_ATTRIBUTE_TENSORS, _ATTRIBUTE_GRAPHS, _ATTRIBUTE_SPARSE = {5, 10}, {6, 11}, {22, 23}
_SPARSE_TENSORS = {1, 2}  # values, indices
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1


def _protobuf_fields(data: memoryview):
    """(field number, value) of one protobuf message: ints for varints, views for the rest."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(data):
        key = varint()
        wire = key & 7
        if wire == 0:
            yield key >> 3, varint()
            continue
        size = {1: 8, 5: 4}.get(wire) if wire != 2 else varint()
        if size is None or pos + size > len(data):
            raise ValueError(f"protobuf wire type {wire} at byte {pos}")
        yield key >> 3, data[pos : pos + size]
        pos += size


def _uses_external_data(model: bytes) -> bool:
    """Whether any tensor of an ONNX model (initializers, constants, subgraphs, functions) keeps its
    data in another file, which onnxruntime would open relative to the current directory, outside
    the manifest's sha256. Read with a protobuf walk of its own: `onnx` is not a runtime dependency."""

    def tensor(data) -> bool:
        return any(
            (field == _TENSOR_DATA_LOCATION and value == _EXTERNAL) or field == _TENSOR_EXTERNAL_DATA
            for field, value in _protobuf_fields(data)
        )

    def sparse(data) -> bool:
        return any(tensor(value) for field, value in _protobuf_fields(data) if field in _SPARSE_TENSORS)

    def node(data) -> bool:
        for field, value in _protobuf_fields(data):
            if field != _NODE_ATTRIBUTES:
                continue
            for kind, item in _protobuf_fields(value):
                if (
                    (kind in _ATTRIBUTE_TENSORS and tensor(item))
                    or (kind in _ATTRIBUTE_GRAPHS and graph(item))
                    or (kind in _ATTRIBUTE_SPARSE and sparse(item))
                ):
                    return True
        return False

    def graph(data) -> bool:
        checks = {_GRAPH_NODES: node, _GRAPH_INITIALIZERS: tensor, _GRAPH_SPARSE_INITIALIZERS: sparse}
        return any(checks[field](value) for field, value in _protobuf_fields(data) if field in checks)

    def function(data) -> bool:
        return any(node(value) for field, value in _protobuf_fields(data) if field == _FUNCTION_NODES)

    checks = {_MODEL_GRAPH: graph, _MODEL_FUNCTIONS: function}
    fields = _protobuf_fields(memoryview(model))
    return any(checks[field](value) for field, value in fields if field in checks)


def _require(mapping: dict, key: str, kind: type, where: str):
    value = mapping.get(key) if isinstance(mapping, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where} lacks a valid {key!r}: retrain or re-export the predictors")
    return value


def _confined(directory: Path, name: str) -> Path:
    """directory/name, refused when name leaves the directory (absolute, `..`, or a link outside)."""
    try:
        path = (directory / name).resolve()
    except (OSError, ValueError):  # a NUL byte, a link loop
        path = Path("/")
    if Path(name).is_absolute() or not path.is_relative_to(directory.resolve()):
        raise UserError(
            f"{directory / MANIFEST} names a file outside its folder ({name!r}): refusing to load"
        )
    return path


@deferred()  # Ctrl-C: after it, not inside onnxruntime's import (an ImportError) or a session's creation
def load_predictor_set(
    directory, fingerprint: str | None = None, threads: int = 1, int8: bool = False, fp16: bool = False
) -> PredictorSet:
    """Open every predictor of a folder written by `edge-preattn train`, checking it all first;
    `int8` / `fp16`: the layers' int8 or fp16 files (train --int8 / --fp16) instead of the fp32 ones."""
    directory = Path(directory)
    if int8 and fp16:
        raise ValueError("load the int8 or the fp16 files, not both")
    form = "int8" if int8 else "fp16" if fp16 else None
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{directory} has no {MANIFEST}: train predictors with `edge-preattn train TRACES -o DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON: retrain or re-export the predictors") from None
    where = str(path)
    if not str(manifest.get("format", "") if isinstance(manifest, dict) else "").startswith(FORMAT):
        raise UserError(f"{path} is not an {FORMAT} manifest: retrain with this version of edge-preattn")
    found = _require(manifest, "fingerprint", str, where)
    if fingerprint is not None and found != fingerprint:
        raise UserError(
            f"{directory} holds predictors of another model (fingerprint {found[:16]} ≠ {fingerprint[:16]}): "
            "collect traces of this model and train predictors for it"
        )
    n_embd, n_expert = _require(manifest, "n_embd", int, where), _require(manifest, "n_expert", int, where)
    _require(manifest, "k", int, where)
    _require(manifest, "input", str, where)
    features = manifest.get("features") or []
    if not isinstance(features, list):
        raise UserError(f"{where} lacks a valid 'features': retrain or re-export the predictors")
    lead = manifest.get("lead", 0)
    if type(lead) is not int or lead < 0:
        raise UserError(f"{where} lacks a valid 'lead': retrain or re-export the predictors")
    sessions = {}
    for entry in _require(manifest, "predictors", list, where):
        il = _require(entry, "layer", int, where)
        if il in sessions:
            raise UserError(f"{path} lists layer {il} twice: retrain or re-export the predictors")
        source = entry.get("source_layer", il)
        if type(source) is not int or not 0 <= source <= il or (source < il and not lead):
            raise UserError(
                f"{where}: layer {il}'s source_layer {source!r} is not a layer at or before it: retrain"
            )
        if form and form not in entry:
            raise UserError(f"{directory} has no {form} predictors: retrain with --{form}, or load fp32")
        files = entry[form] if form else entry
        name, sha = _require(files, "file", str, where), _require(files, "sha256", str, where)
        file = _confined(directory, name)
        if file.exists() and not file.is_file():
            raise UserError(f"{file} is not a regular file: retrain or copy the whole predictors folder")
        try:
            data = file.read_bytes()
        except OSError:
            raise UserError(f"{file} is missing: retrain or copy the whole predictors folder") from None
        if sha256_bytes(data) != sha:
            raise UserError(f"{file} does not match its sha256 in {MANIFEST} (changed or damaged): retrain")
        try:
            external = _uses_external_data(data)
        except (ValueError, IndexError):
            external = False  # not protobuf: onnxruntime refuses it below
        if external:
            raise UserError(
                f"{file} keeps weights in a separate file (ONNX external data), outside {MANIFEST}'s "
                "sha256: refusing to load; export the predictors with their weights inside"
            )
        try:
            session = _session(data, threads)
        except Exception as error:  # onnxruntime raises its own exception types
            raise UserError(
                f"{file} is not a loadable ONNX model ({type(error).__name__}): retrain"
            ) from None
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if (
            [i.name for i in inputs] != ["x", *(input_name(str(f)) for f in features)]
            or [o.name for o in outputs] != ["scores"]
            or inputs[0].shape[-1] != n_embd
            or outputs[0].shape[-1] != n_expert
        ):
            raise UserError(
                f"{file} maps {inputs[0].shape} → {outputs[0].shape}, not [N, {n_embd}] → [N, {n_expert}] "
                f"as {MANIFEST} says: retrain"
            )
        sessions[il] = session
    if not sessions:
        raise UserError(f"{path} lists no predictors: retrain")
    return PredictorSet(directory, manifest, sessions, int8, fp16)
