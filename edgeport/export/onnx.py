"""torch -> ONNX: the torch.export-based exporter first, the legacy TorchScript one as fallback.

The artifact records which path was taken and why. The written file has been through
`onnx.checker` (full check) and shape inference, carries metadata props (edgeport version,
source-model hash, precision, exporter), is a single file below 2 GB (external data above),
and loads in ONNX Runtime. A model neither path can convert raises `ExportError` naming the
failing op and the `nn.Module` path that produced it.
"""
from __future__ import annotations

import contextlib
import gc
import io
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.utils._pytree import GetAttrKey, MappingKey

from edgeport.devices.catalog import u8s8_saturates
from edgeport.errors import BackendUnavailable, ExportError, UserError
from edgeport.export.onnxgraph import keep_residual_norms_apart
from edgeport.core import (Artifact, Backend, ExportRequest, Runner, TensorSpec, input_names, option,
                           source_sha256, torch_logs_silenced)

SINGLE_FILE_LIMIT = 1_800_000_000  # bytes; protobuf's hard limit is 2 GiB, keep headroom
DYNAMO_MIN_OPSET = 18  # the torch.export path silently raises anything lower to 18
# The legacy exporter writes 13..20, torch.export 18..23 (torch 2.13's ONNX_MAX_OPSET); below 13
# the zoo's own ops (e.g. Softmax over one axis, Split with inputs) do not exist.
MIN_OPSET, MAX_OPSET = 13, 23
EXPORTERS = ("auto", "torch.export", "legacy-torchscript")

_ONNX_DTYPES = {v: np.dtype(k).name for k, v in {
    np.float32: onnx.TensorProto.FLOAT, np.float16: onnx.TensorProto.FLOAT16, np.float64: onnx.TensorProto.DOUBLE,
    np.int64: onnx.TensorProto.INT64, np.int32: onnx.TensorProto.INT32, np.int8: onnx.TensorProto.INT8,
    np.uint8: onnx.TensorProto.UINT8, np.bool_: onnx.TensorProto.BOOL}.items()}


@contextlib.contextmanager
def quiet():
    """Silence the exporters' progress prints, deprecation warnings and log noise, and what
    their C++ parts print on the process's stdout (the legacy exporter's "Torch IR graph at
    exception" dump: stdout carries results and --json)."""
    with torch_logs_silenced("torch.onnx", "onnxscript", "onnx_ir"), warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            _stdout_descriptor_silenced():
        warnings.simplefilter("ignore")
        yield


_silenced = {"depth": 0, "saved": None}  # file descriptor 1 while silenced, shared by nested and threaded users
_silenced_lock = threading.Lock()


@contextlib.contextmanager
def _stdout_descriptor_silenced():
    """File descriptor 1 on /dev/null until the last user leaves (exports in threads overlap);
    left alone where the process has no stdout to silence."""
    with _silenced_lock:
        if _silenced["depth"] == 0:
            try:
                sys.__stdout__.flush() if sys.__stdout__ else None
                saved = os.dup(1)
            except (OSError, ValueError):
                saved = None
            if saved is not None:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.close(null)
            _silenced["saved"] = saved
        _silenced["depth"] += 1
    try:
        yield
    finally:
        with _silenced_lock:
            _silenced["depth"] -= 1
            if _silenced["depth"] == 0 and _silenced["saved"] is not None:
                os.dup2(_silenced["saved"], 1)
                os.close(_silenced["saved"])
                _silenced["saved"] = None


def _dynamo_export(model, args, path: Path, names, outputs, opset, dynamic_axes, large: bool) -> None:
    from edgeport.quant.qdq import TRANSLATIONS

    shapes = tuple(dynamic_axes.get(n) for n in names) if dynamic_axes else None
    torch.onnx.export(model, args, str(path), dynamo=True, external_data=large, opset_version=opset,
                      input_names=names, output_names=outputs, dynamic_shapes=shapes, verbose=False,
                      optimize=True, custom_translation_table=TRANSLATIONS)


def _legacy_export(model, args, path: Path, names, outputs, opset, dynamic_axes, large: bool) -> None:
    axes = dict(dynamic_axes or {})
    if any(0 in v for v in axes.values()):  # a dynamic batch on the inputs is one on the outputs
        axes.update({n: {0: "batch"} for n in outputs})
    torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset or 18, input_names=names,
                      output_names=outputs, dynamic_axes=axes or None, do_constant_folding=True)


PATHS = {"torch.export": _dynamo_export, "legacy-torchscript": _legacy_export}


def output_names_for(outputs) -> list[str]:
    """Names for a model's outputs in pytree order (the order both exporters flatten them in):
    the keys and fields of dicts, `transformers` ModelOutputs and named tuples
    (`last_hidden_state`, `hidden_states.0`), else `output_<i>` for a tensor or plain tuple."""
    leaves = [path for path, leaf in torch.utils._pytree.tree_flatten_with_path(outputs)[0]
              if isinstance(leaf, torch.Tensor)]
    positional = [f"output_{i}" for i in range(len(leaves))]
    if not any(isinstance(key, (MappingKey, GetAttrKey)) for path in leaves for key in path):
        return positional
    names = [_path_name(path) for path in leaves]
    return names if len(set(names)) == len(names) else positional


def _path_name(path: tuple) -> str:
    """A pytree path as a name: keys and fields joined by dots (`hidden_states.0`)."""
    return ".".join(str(key.key) if isinstance(key, MappingKey) else key.name if isinstance(key, GetAttrKey)
                    else str(key.idx) for key in path)


def _tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim]
        specs.append(TensorSpec(value.name, dims, _ONNX_DTYPES.get(tensor_type.elem_type, str(tensor_type.elem_type))))
    return specs


def _graph_inputs(proto: onnx.ModelProto) -> list:
    """The graph's real inputs (older files also list their initializers as inputs)."""
    initializers = {i.name for i in proto.graph.initializer}
    return [v for v in proto.graph.input if v.name not in initializers]


def _finalize(path: Path, metadata: dict[str, str], onnxruntime_form: bool,
              unsigned: bool) -> tuple[int, list[str]]:
    """Fold weight quantization (and, with `onnxruntime_form`, write quantized Linears and matmuls
    in the integer forms ONNX Runtime fuses best, their weights as uint8 where `unsigned`, and keep
    its slow SkipLayerNormalization fusion off the residual norms), shape-infer, stamp metadata,
    save (single file or external data), full-check the file.

    Returns the default-domain opset and the names of every file the model occupies.
    """
    from edgeport.quant.qdq import (code_domain_convs, fold_weight_quantization, integer_matmuls, requantized_gemms,
                                    unsigned_weights)

    model = onnx.load(str(path))
    if fold_weight_quantization(model) and onnxruntime_form:
        gemms = requantized_gemms(model)
        metadata = metadata | {"edgeport.quantized_matmuls": f"{integer_matmuls(model)} as MatMulInteger, "
                                                             f"{gemms} as re-quantizing Gemm, "
                                                             f"{code_domain_convs(model)} convs on codes"}
        if unsigned:
            metadata = metadata | {"edgeport.int8_weights": f"{unsigned_weights(model)} as uint8 (zero point 128)"}
    if onnxruntime_form and keep_residual_norms_apart(model.graph):
        metadata = metadata | {"edgeport.residual_adds": "Sum: kept out of SkipLayerNormalization"}
    large = model.ByteSize() > SINGLE_FILE_LIMIT
    if not large:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    stamped = {p.key: p.value for p in model.metadata_props} | metadata
    del model.metadata_props[:]
    for key, value in sorted(stamped.items()):
        model.metadata_props.add(key=key, value=value)
    for stale in path.parent.glob(path.name + "*.data"):
        stale.unlink()
    files = [path.name]
    if large:
        data_name = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        files.insert(0, data_name)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return opset, files


def _loads_in_onnxruntime(path: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnx(model: torch.nn.Module, args: tuple[torch.Tensor, ...], folder: Path, name: str, *,
                opset: int | None = None, dynamic_axes: dict[str, dict[int, str]] | None = None,
                exporter: str = "auto", precision: str = "fp32", names: list[str] | None = None,
                output_names: list[str] | None = None, onnxruntime_form: bool = True,
                unsigned_weights: bool = False) -> Artifact:
    """Export `model` called on `args` to `folder/name.onnx`; returns the (unverified) Artifact.

    `dynamic_axes` maps input names to {axis: symbol}, e.g. {"x": {0: "batch"}}. Inputs are
    named after the forward's parameters and outputs after the model's own output structure
    (see `output_names_for`), unless `names` and `output_names` say otherwise. A quantized
    model's Linears re-quantized after only data movement are written as Gemm between DQ and Q
    (see `edgeport.quant.qdq.requantized_gemms`), its other matmuls that a constant scale or bias
    follows as MatMulInteger (see `edgeport.quant.qdq.integer_matmuls`) and residual Adds into a
    LayerNormalization as Sum (see `onnxgraph.keep_residual_norms_apart`) unless
    `onnxruntime_form=False` leaves these out: TensorRT's form, every quantized matmul in QDQ.
    `unsigned_weights` stores the ONNX Runtime form's 8-bit weights as uint8 (see
    `edgeport.quant.qdq.unsigned_weights`: exact on x86 CPUs without VNNI).
    `exporter="auto"` tries torch.export then the legacy exporter; each path must produce a
    file that passes the full checker and loads in ONNX Runtime, or the next one is tried.
    """
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    names = names or input_names(model, len(args))
    unknown = set(dynamic_axes or {}) - set(names)
    if unknown:
        raise UserError(f"dynamic axes name unknown inputs {sorted(unknown)}; the inputs are {names}")
    widened = _size_one_dynamic_axes(names, args, dynamic_axes)
    args = _traced_at_two(names, args, widened)
    try:
        with torch.no_grad():
            returned = model(*args)
    except Exception as error:  # the model's own error, whatever its type
        if not widened:
            raise
        if all(axis == 0 for _, axis in widened):
            raise UserError(f"a dynamic batch on axis 0: the model refuses its inputs at batch 2 "
                            f"({summarize_error(error)}); an input whose batch is on another axis (an LSTM state "
                            f"[layers, batch, hidden]) needs dynamic axes that name that axis instead") from error
        axes = ", ".join(f"{name} axis {axis}" for name, axis in widened)
        raise UserError(f"dynamic axes of size 1 ({axes}) are traced at size 2, which torch.export keeps symbolic: "
                        f"the model refuses its inputs so ({summarize_error(error)}); give an example longer than 1 "
                        f"on those axes") from error
    _refuse_opaque_outputs(model, returned)
    outputs = output_names or output_names_for(returned)
    path = folder / f"{name}.onnx"
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > SINGLE_FILE_LIMIT
    order = ["torch.export", "legacy-torchscript"] if exporter == "auto" else [exporter]
    notes: list[str] = []
    if isinstance(model, torch.jit.ScriptModule) and "torch.export" in order:
        notes.append("a TorchScript module: torch.export cannot take it, the legacy exporter can")
        order.remove("torch.export")
        if not order:
            raise UserError("torch.export cannot export a TorchScript module; use exporter 'auto' or "
                            "'legacy-torchscript'")
    if opset is not None and opset < DYNAMO_MIN_OPSET and "torch.export" in order:
        notes.append(f"opset {opset} < {DYNAMO_MIN_OPSET}: only the legacy exporter can write it")
        order.remove("torch.export")
        if not order:
            raise UserError(f"the torch.export path writes opset {DYNAMO_MIN_OPSET} or newer, not {opset}")
    metadata = {"edgeport.source_sha256": source_sha256(model), "edgeport.precision": precision}
    failures: dict[str, BaseException] = {}
    for route in order:
        try:
            with quiet():
                PATHS[route](model, args, path, names, outputs, opset, dynamic_axes, large)
                from edgeport import __version__
                written_opset, files = _finalize(path, metadata | {"edgeport.version": __version__,
                                                                    "edgeport.exporter": route}, onnxruntime_form,
                                                   unsigned_weights)
                _loads_in_onnxruntime(path)
        except Exception as error:  # each exporter raises its own zoo of types
            for leftover in folder.glob(path.name + "*"):
                leftover.unlink()
            if route == "torch.export" and dynamic_axes and FIXED_AXIS.search(str(error)):
                # the legacy exporter would write the axis symbolic all the same: a file that
                # passes at the example's size and fails at every other
                raise UserError(f"the model fixes the size of a dynamic axis: {_fixed_axes(error, dynamic_axes)} "
                                f"(found by torch.export); export without a dynamic axis there"
                                f"{_static_partners(names, args, dynamic_axes)}") from error
            failures[route] = error
            notes.append(f"{route} failed: {summarize_error(error)}")
            continue
        proto = onnx.load(str(path), load_external_data=False)
        return Artifact(
            path=path, format="onnx", precision=precision, inputs=_tensor_specs(_graph_inputs(proto)),
            outputs=_tensor_specs(proto.graph.output), source_sha256=metadata["edgeport.source_sha256"],
            exporter=route, opset=written_opset, notes=notes, files=files,
            settings={"opset_requested": opset, "dynamic_axes": dynamic_axes or {}, "exporter_requested": exporter,
                      "external_data": len(files) > 1})
    raise ExportError(diagnose(model, args, failures))


def _size_one_dynamic_axes(names: list[str], args: tuple[torch.Tensor, ...],
                           dynamic_axes: dict[str, dict[int, str]] | None) -> list[tuple[str, int]]:
    """The (input, axis) pairs declared dynamic whose example size is 1: torch.export fixes a
    size-1 dimension to 1 (and transformers' attention branches on a symbolic length of 1), so
    they are traced at 2. A dynamic batch widens every input's axis 0 of size 1, as before."""
    batch = bool(dynamic_axes) and any(0 in axes for axes in dynamic_axes.values())
    pairs = []
    for name, arg in zip(names, args):
        axes = set((dynamic_axes or {}).get(name, {})) | ({0} if batch else set())
        pairs += [(name, axis) for axis in sorted(axes) if axis < arg.dim() and arg.shape[axis] == 1]
    return pairs


def _traced_at_two(names: list[str], args: tuple[torch.Tensor, ...],
                   widened: list[tuple[str, int]]) -> tuple[torch.Tensor, ...]:
    """`args` with each (input, axis) in `widened` repeated to size 2."""
    traced = []
    for name, arg in zip(names, args):
        for axis in (axis for widened_name, axis in widened if widened_name == name):
            arg = arg.expand(*arg.shape[:axis], 2, *arg.shape[axis + 1:]).clone()
        traced.append(arg)
    return tuple(traced)


def _refuse_opaque_outputs(model: torch.nn.Module, returned) -> None:
    """Refuse a model that returns an object neither exporter can write as tensors, naming it:
    a `transformers` decoder built with `use_cache=True` (GPT-2's and Llama's default) returns
    its key/value cache as a `DynamicCache`, which both exporters fail on in words of their own."""
    leaves = torch.utils._pytree.tree_flatten_with_path(returned)[0]
    opaque = [(path, leaf) for path, leaf in leaves
              if leaf is not None and not isinstance(leaf, (torch.Tensor, int, float, bool, str))]
    if not opaque:
        return
    path, leaf = opaque[0]
    where = f"`{_path_name(path)}`" if path else "its output"
    kind = type(leaf).__name__
    hint = (" (its key/value cache): build it with use_cache=False (or set model.config.use_cache = False) to "
            "export it" if kind.endswith("Cache") else ": return only tensors (in a tuple, dict or dataclass)")
    raise UserError(f"{type(model).__name__} returns a {kind} at {where}, which ONNX cannot hold{hint}")


def _static_partners(names: list[str], args: tuple[torch.Tensor, ...],
                     dynamic_axes: dict[str, dict[int, str]]) -> str:
    """A hint naming the static axes of other inputs as long as a dynamic one: a mask left
    static pins the ids it must match (`input_ids` dynamic, `attention_mask` not)."""
    sizes = {args[names.index(name)].shape[axis] for name, axes in dynamic_axes.items() for axis in axes
             if name in names and axis < args[names.index(name)].dim()}
    partners = [f"{name} axis {axis} at {size}" for name, arg in zip(names, args)
                for axis, size in enumerate(arg.shape) if size in sizes and size > 1
                and axis not in dynamic_axes.get(name, {})]
    if not partners:
        return ""
    return (f"; static axes of the same size ({', '.join(partners)}): if the model ties them to the dynamic one "
            f"(a mask as long as its ids), declare them dynamic too")


# how torch.export says that the model's code pins a size the caller declared dynamic
FIXED_AXIS = re.compile(r"Constraints violated|conflicts? between user-specified ranges and inferred ranges|"
                        r"specialized to be a constant|not all values of .* in the specified range", re.S)


def _fixed_axes(error: BaseException, dynamic_axes: dict[str, dict[int, str]]) -> str:
    """Which axes torch.export found static, from its message ("x axis 2 is always 16"), or the
    dynamic axes asked for and its first line where it names none."""
    pinned = re.findall(r"static shape of (\d+) for dimension inputs\['(\w+)'\]\.shape\[(\d+)\]", str(error))
    if pinned:
        return ", ".join(f"{name} axis {axis} is always {size}" for size, name, axis in pinned)
    asked = ", ".join(f"{name} axis {axis} ({symbol})" for name, axes in dynamic_axes.items()
                      for axis, symbol in axes.items())
    return f"one of {asked}: {summarize_error(error)}"


def summarize_error(error: BaseException) -> str:
    """The one line of an exporter's error that says what went wrong."""
    text = str(error)
    summary = text.split("## Exception summary", 1)
    lines = [ln.strip() for ln in (summary[1] if len(summary) > 1 else text).splitlines() if ln.strip()]
    line = lines[0] if lines else type(error).__name__
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    return (line[:300] + "…") if len(line) > 300 else line


def diagnose(model: torch.nn.Module, args: tuple, failures: dict[str, BaseException]) -> str:
    """Name the ops the exporters could not convert and the module paths that call them."""
    failing = {m for e in failures.values() for m in re.findall(r"aten(?:\.|::)([A-Za-z0-9_]+)", str(e))}
    used = trace_ops(model, args)
    places = []
    for op in sorted(failing):
        paths = {p for name, ps in used.items() if name.startswith(op) or op.startswith(name) for p in ps}
        where = ", ".join(sorted(paths)[:5]) if paths else "unknown module"
        places.append(f"aten.{op} in {where}")
    detail = "; ".join(f"{route}: {summarize_error(e)}" for route, e in failures.items())
    if places:
        return f"cannot export to ONNX: no conversion for {'; '.join(places)} ({detail})"
    return f"cannot export to ONNX: {detail}"


def trace_ops(model: torch.nn.Module, args: tuple) -> dict[str, set[str]]:
    """Run the model once and record, for each aten op, the module paths that called it.

    A path reads like `blocks.0.attn (Attention)`; the root module is `<root> (ClassName)`.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    names = {id(m): n for n, m in model.named_modules()}
    stack = [f"<root> ({type(model).__name__})"]
    used: dict[str, set[str]] = {}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            used.setdefault(func.overloadpacket.__name__, set()).add(stack[-1])
            return func(*args, **(kwargs or {}))

    def push(module, _inputs):
        if id(module) in names and names[id(module)]:
            stack.append(f"{names[id(module)]} ({type(module).__name__})")

    def pop(module, _inputs, _outputs):
        if id(module) in names and names[id(module)]:
            stack.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(push)
    post = torch.nn.modules.module.register_module_forward_hook(pop)
    try:
        with torch.no_grad(), Recorder():
            model(*args)
    except Exception:  # the diagnosis is best effort; the export errors are reported anyway
        pass
    finally:
        pre.remove()
        post.remove()
    return used


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime session on the providers actually available here (CPU unless told).

    `threads` sets intra-op threads (None: ORT's default). `spinning=False` stops idle
    worker threads from busy-waiting, which matters when another session is being timed
    in the same process. `quantized_kernels=False` runs Q/DQ nodes as written, dequantized
    values in float ops, instead of fusing them into ONNX Runtime's integer kernels.
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 spinning: bool = True, quantized_kernels: bool = True):
        self.path, self.threads, self.spinning = Path(path), threads, spinning
        self.quantized_kernels = quantized_kernels
        self.providers = providers
        self.name, self.session = "onnxruntime", None
        self.input_names: list[str] = []
        self.output_names: list[str] = []

    def load(self) -> "OnnxRuntimeRunner":
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = self.providers or ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendUnavailable(f"onnxruntime {missing[0]}", f"this onnxruntime build offers {available}",
                                     "install an onnxruntime build with that execution provider")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not self.quantized_kernels:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as error:  # ORT raises its own Fail/InvalidGraph types for bad files
            raise UserError(f"onnxruntime cannot load {self.path}: {str(error).splitlines()[0]}") from error
        self.device = "cpu" if providers == ["CPUExecutionProvider"] else providers[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        return self

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outputs))

    def close(self) -> None:
        """Release the session now: a spinning session waiting for the garbage collector keeps
        its worker threads busy, which halved the speed of the next session timed here."""
        self.session = None
        if self.spinning:  # a full collection costs ~0.1 s: only worth it where threads spin
            gc.collect()


@dataclass
class OnnxFileOptions:
    """How the ONNX file is written."""

    opset: int | None = option(None, "ONNX opset (default: the exporter's; below 18 uses the legacy exporter)",
                               flag="--opset", keyword="opset", minimum=MIN_OPSET, maximum=MAX_OPSET)
    exporter: str = option("auto", "Which torch exporter: torch.export first with the legacy one as fallback, "
                                   "or only one of them", flag="--exporter", keyword="exporter", choices=EXPORTERS)


INT8_WEIGHTS = ("auto", "signed", "unsigned")


@dataclass
class OnnxOptions(OnnxFileOptions):
    """How the ONNX file for ONNX Runtime is written."""

    int8_weights: str = option(
        "auto", "A quantized model's 8-bit weights as int8 (fastest on CPUs with VNNI or AMX, and on ARM; "
                "x86 CPUs without VNNI saturate) or as uint8 (exact on every CPU); auto: signed where this host "
                "multiplies them exactly", flag="--int8-weights", keyword="int8_weights", choices=INT8_WEIGHTS)


def int8_weights_note(requested: str, unsigned: bool) -> str:
    """What the sidecar says of a quantized artifact's weight type, and on which CPUs it runs exactly."""
    if unsigned:
        why = "this host's CPU would saturate int8 weights (x86 without VNNI)" if requested == "auto" else "asked for"
        return (f"uint8 ({why}): exact on every CPU; on CPUs with VNNI or AMX, int8 weights "
                f"(`--int8-weights signed`) run faster")
    why = "this host multiplies them exactly" if requested == "auto" else "asked for"
    return (f"int8 ({why}): exact on CPUs with VNNI or AMX and on ARM; x86 CPUs without VNNI (AMD Zen 1-3, Intel "
            f"Xeons before Cascade Lake, Intel client CPUs before Ice Lake) saturate, where `--int8-weights unsigned` "
            f"is exact")


def saturation_hint(artifact: Artifact) -> str:
    """Why an ONNX artifact may fail verification on this host however faithful its graph: int8
    weights that can saturate (`edgeport.quant.qdq.pairs_can_saturate`), which this host's ONNX
    Runtime multiplies inexactly (x86 without VNNI); empty where that cannot be the cause (another
    format, the TensorRT form, which is verified with its Q/DQ unfused, uint8 weights, or a host
    that multiplies exactly)."""
    if artifact.format != "onnx" or "tensorrt" in artifact.settings or not u8s8_saturates():
        return ""
    from onnx import numpy_helper

    from edgeport.quant.qdq import pairs_can_saturate

    graph = onnx.load(str(artifact.path)).graph
    if not any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2
               and pairs_can_saturate(numpy_helper.to_array(t)) for t in graph.initializer):
        return ""
    return ("; this host's ONNX Runtime multiplies uint8 by int8 inexactly (an x86 CPU without VNNI: products are "
            "added in pairs in 16 bits, which saturate) and the file has int8 weights: uint8 weights "
            "(`--int8-weights unsigned` for edgeport's exports) or a CPU with VNNI run them exactly")


class OnnxBackend(Backend):
    """ONNX for ONNX Runtime: torch.export (legacy exporter as fallback), run by ONNX Runtime."""

    name = "onnx"
    summary = "ONNX, verified in ONNX Runtime"
    Options = OnnxOptions
    formats = ("onnx",)
    quantized = ("QuantizeLinear/DequantizeLinear with integer weights; Linears re-quantized after only data "
                 "movement as Gemm between DQ and Q, other matmuls that a constant scale or bias follows as "
                 "MatMulInteger, which ONNX Runtime fuses into integer kernels (QGemm, MatMulIntegerToFloat)")

    def export(self, request: ExportRequest, options: OnnxOptions) -> list[Artifact]:
        unsigned = options.int8_weights == "unsigned" or (options.int8_weights == "auto" and u8s8_saturates())
        artifact = export_onnx(request.module, request.args, request.folder, request.name, opset=options.opset,
                               dynamic_axes=request.dynamic_axes, exporter=options.exporter,
                               precision=request.precision, names=request.input_names,
                               output_names=request.output_names, onnxruntime_form=True, unsigned_weights=unsigned)
        if request.precision != "fp32":
            artifact.settings["int8_weights"] = int8_weights_note(options.int8_weights, unsigned)
        return [artifact]

    suffixes = (".onnx",)

    def runner(self, artifact: Artifact, threads: int | None = None, profiling: bool = False) -> Runner:
        # verification sessions do not spin: they would distort timings taken beside them. The
        # ONNX written for TensorRT runs its Q/DQ as written, the arithmetic TensorRT's int8
        # kernels reproduce: ONNX Runtime's own u8 x s8 kernels saturate on x86 CPUs without VNNI
        return OnnxRuntimeRunner(artifact.path, threads=threads, spinning=profiling,
                                 quantized_kernels="tensorrt" not in artifact.settings)

    def describe(self, path: Path) -> Artifact:
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as error:  # protobuf raises its own DecodeError for a file that is not ONNX
            raise UserError(f"cannot read {path} as ONNX: {str(error).splitlines()[0][:160]}") from error
        if not proto.graph.node or not _graph_inputs(proto):  # an empty file parses as an empty model
            raise UserError(f"cannot read {path} as ONNX: it holds no graph with inputs")
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        return Artifact(path=path, format="onnx", precision="unknown", inputs=_tensor_specs(_graph_inputs(proto)),
                        outputs=_tensor_specs(proto.graph.output), source_sha256="", exporter="unknown (no sidecar)",
                        opset=opset)


BACKEND = OnnxBackend()
