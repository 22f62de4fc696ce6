"""The Python API: resolve a model, export it to each target, verify every artifact.

    import edgeport as ep
    arts = ep.export("vit-digits", targets=["onnx"], out="build/vit")
    print(arts["onnx"].parity.summary())

A model is an `nn.Module`, a zoo name, a `.pt2` file (torch.export) or
`package.module:factory` (weights from `weights=`, read without executing code).
"""
from __future__ import annotations

import difflib
import gc
import importlib
import pickle
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edgeport import zoo
from edgeport.errors import BackendUnavailable, CheckFailed, UserError
from edgeport.export.artifact import Artifact, Staging
from edgeport.export.coreml import export_coreml
from edgeport.export.onnx import export_onnx, input_names
from edgeport.export.spiking import build_form, verify_spiking
from edgeport.export.verify import ParityReport, Tolerance, compare
from edgeport.runtime.report import Profile
from edgeport.runtime.runners import OnnxRuntimeRunner, TorchRunner, in_eval_mode, runner_for

TARGETS = ("onnx", "coreml", "tensorrt")
Example = torch.Tensor | Sequence[torch.Tensor]


def _refuse_pickle(path: Path, error: Exception) -> UserError:
    return UserError(f"refusing to load {path}: it is a pickle that needs code execution to load "
                     f"({str(error).splitlines()[0][:160]}); save the model with torch.export (.pt2) or "
                     f"give package.module:factory with safetensors or weights-only state_dict")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from safetensors or a weights-only torch file; never executes pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refuse_pickle(path, error) from error
    except Exception as error:
        raise UserError(f"cannot read weights {path}: {str(error).splitlines()[0][:200]}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
    return state


def load_model(spec: str | torch.nn.Module, weights: str | Path | None = None) -> torch.nn.Module:
    """Resolve a model given as a module, zoo name, `.pt2` file or `package.module:factory`."""
    if isinstance(spec, torch.nn.Module):
        return in_eval_mode(spec)
    if isinstance(spec, torch.export.ExportedProgram):
        return spec.module()  # already in inference form; it refuses .eval()
    text = str(spec)
    path = Path(text)
    if text in zoo.names():
        model = zoo.load(text)
    elif path.suffix == ".pt2":
        if not path.is_file():
            raise UserError(f"model file {path} does not exist")
        try:
            program = torch.export.load(str(path))
        except Exception as error:
            raise UserError(f"cannot read {path} as a torch.export program: "
                            f"{str(error).splitlines()[0][:200]}") from error
        if weights is not None:
            raise UserError("a .pt2 file carries its own weights; drop --weights")
        return program.module()
    elif re.fullmatch(r"[\w.]+:\w+", text):
        module_name, factory_name = text.split(":")
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError) as error:
            raise UserError(f"cannot import {text}: {error}") from error
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"{text} returned a {type(model).__name__}, not a torch.nn.Module")
    elif path.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"):
        if not path.is_file():
            raise UserError(f"model file {path} does not exist")
        load_weights(path)  # refuses code-executing pickles; a plain state_dict passes
        raise UserError(f"{path} holds weights, not a model: give the architecture as "
                        f"package.module:factory with --weights {path}, or export a .pt2")
    else:
        close = difflib.get_close_matches(text, zoo.names(), n=2)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"cannot resolve model {text!r}: {hint}give a zoo name ({', '.join(zoo.names())}), "
                        f"a .pt2 file, or package.module:factory")
    if weights is not None:
        try:
            model.load_state_dict(load_weights(weights))
        except RuntimeError as error:
            raise UserError(f"weights {weights} do not fit {text}: {str(error).splitlines()[0][:200]}") from error
    return in_eval_mode(model)


def parse_input(text: str) -> torch.Tensor:
    """An example input from `1x1x8x8` or `1x16:int64`: seeded random data of that shape and dtype."""
    match = re.fullmatch(r"(\d+(?:x\d+)*)(?::(\w+))?", text.strip())
    if not match:
        raise UserError(f"input shape {text!r} is not like 1x3x224x224 or 1x16:int64")
    shape = [int(d) for d in match.group(1).split("x")]
    dtype = getattr(torch, match.group(2) or "float32", None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"unknown dtype {match.group(2)!r} in input {text!r}")
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, 100, shape, generator=generator, dtype=dtype)


def parse_dynamic(specs: Sequence[str]) -> dict[str, dict[int, str]] | None:
    """Dynamic axes from `input_ids:1:sequence` strings, as {input: {axis: symbol}}."""
    axes: dict[str, dict[int, str]] = {}
    for spec in specs:
        match = re.fullmatch(r"(\w+):(\d+):(\w+)", spec.strip())
        if not match:
            raise UserError(f"dynamic axis {spec!r} is not like input_ids:1:sequence")
        axes.setdefault(match.group(1), {})[int(match.group(2))] = match.group(3)
    return axes or None


def as_args(example: Example) -> tuple[torch.Tensor, ...]:
    """Normalize an example to a tuple of tensors."""
    args = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise UserError("an example must be a tensor or a sequence of tensors")
    return args


def _model_and_example(model, example: Example | None, weights) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The resolved torch model and its example arguments (a zoo model brings its own)."""
    torch_model = load_model(model, weights)
    if example is None:
        if not (isinstance(model, str) and model in zoo.names()):
            raise UserError("an example input is needed (e.g. --input 1x3x224x224); only zoo models bring their own")
        example = zoo.example(model)
    return torch_model, as_args(example)


def _run_reference(model: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    shapes = ", ".join("x".join(map(str, a.shape)) + f":{str(a.dtype).removeprefix('torch.')}" for a in args)
    try:
        with torch.no_grad():
            model(*args)
    except Exception as error:
        raise UserError(f"the model does not accept input {shapes}: {str(error).splitlines()[0][:200]}") from error


def default_inputs(model_spec, args: tuple[torch.Tensor, ...], count: int = 4) -> tuple[list[tuple], str]:
    """Inputs for verification when none are given: a zoo model's test images, else the
    example plus seeded random draws shaped like it (labelled as such in the report)."""
    if isinstance(model_spec, str) and model_spec in zoo.names():
        images = zoo.testset(model_spec)[0][:64]
        return [(images[i:i + args[0].shape[0]],) for i in range(0, len(images), args[0].shape[0])], \
            f"{model_spec} test images"
    generator = torch.Generator().manual_seed(1)

    def draw(a: torch.Tensor) -> torch.Tensor:  # same dtype, similar range as the example
        if a.dtype.is_floating_point:
            return (torch.randn(a.shape, generator=generator) * a.float().std().nan_to_num(1.0).clamp(min=1e-3)
                    + a.float().mean()).to(a.dtype)
        return torch.randint(int(a.min()), int(a.max()) + 1, a.shape, generator=generator, dtype=a.dtype)

    batches = [args] + [tuple(draw(a) for a in args) for _ in range(count - 1)]
    return batches, f"the example + {count - 1} seeded random inputs"


def _feeds(names: list[str], batches: Sequence[Example], static_batch: int | None) -> list[dict[str, np.ndarray]]:
    """Feed dicts keyed by input name; batches are split to an artifact's static batch size
    (a remainder smaller than that size is left out)."""
    feeds = []
    for batch in batches:
        arrays = [a.detach().cpu().numpy() for a in as_args(batch)]
        if len(arrays) != len(names):
            raise UserError(f"verification inputs have {len(arrays)} tensors, the model takes {len(names)}")
        size = arrays[0].shape[0] if arrays[0].ndim else 1
        step = static_batch if static_batch and static_batch < size else size
        for start in range(0, size - size % step, step):
            feeds.append({n: a[start:start + step] for n, a in zip(names, arrays)})
    return feeds


def verify(artifact: Artifact | str | Path, model: str | torch.nn.Module, inputs: Sequence[Example] | None = None,
           *, weights: str | Path | None = None, tolerance: Tolerance | None = None,
           inputs_source: str = "given inputs") -> ParityReport:
    """Run `artifact` and the torch `model` on the same inputs and report per-output parity.

    `inputs` is a sequence of batches (each a tensor or tuple of tensors); with None, a zoo
    model's test images are used, or random draws shaped like the artifact's inputs.
    """
    art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    torch_model = load_model(model, weights)
    candidate = runner_for(art.path, art.format).load()
    torch_names = input_names(torch_model, len(art.inputs))
    if inputs is None:
        shapes = [[d if isinstance(d, int) else 1 for d in spec.shape] for spec in art.inputs]
        example = tuple(torch.zeros(s, dtype=getattr(torch, spec.dtype)) for s, spec in zip(shapes, art.inputs))
        inputs, inputs_source = default_inputs(model, example)
    static = art.inputs[0].shape[0] if art.inputs and art.inputs[0].shape and isinstance(art.inputs[0].shape[0], int) else None
    feeds = _feeds(torch_names, inputs, static)
    for feed in feeds:  # the artifact may name its inputs differently: match them by position
        for artifact_name, torch_name in zip(candidate.input_names, torch_names):
            feed.setdefault(artifact_name, feed[torch_name])
    reference = TorchRunner(torch_model, torch_names, candidate.output_names).load()
    try:
        return compare(reference, candidate, feeds, precision=art.precision, inputs_source=inputs_source,
                       tolerance=tolerance)
    finally:
        candidate.close()


def _check_numerics(artifact: Artifact, torch_model: torch.nn.Module, form, batches: Sequence[Example], source: str,
                    tolerance: Tolerance | None) -> ParityReport | None:
    """Parity of an artifact against its torch model where its runtime runs here; None (and
    the reason in the artifact's settings) where it does not, as Core ML off macOS."""
    try:
        if form is None:
            return verify(artifact, torch_model, batches, tolerance=tolerance, inputs_source=source)
        runner = runner_for(artifact.path, artifact.format).load()
    except BackendUnavailable as unavailable:
        artifact.settings.setdefault("verification", {})["numerical"] = f"not checked here: {unavailable.reason}"
        artifact.notes.append(f"numerical parity NOT checked: {unavailable.reason}")
        return None
    arrays = [as_args(b)[0].detach().cpu().numpy() for b in batches]
    return verify_spiking(runner, form, torch_model, arrays, source)


def precision_of(model: torch.nn.Module) -> str:
    """The precision label: "fp32", or "w<bits>a<bits>" for a model from `edgeport.quantize` (its narrowest layer)."""
    from edgeport.quant.quantizers import UniformQuantizer

    weights = [m.wq.bits for m in model.modules() if isinstance(getattr(m, "wq", None), UniformQuantizer)]
    acts = [m.act.bits for m in model.modules() if isinstance(getattr(m, "act", None), UniformQuantizer)]
    return f"w{min(weights)}a{min(acts)}" if weights and acts else "fp32"


def _profile_shapes(artifact: Artifact, args: tuple[torch.Tensor, ...]) -> dict:
    """(min, opt, max) per input with symbolic dims: 1, the example's size, 4x it (at least 8)."""
    shapes = {}
    for spec, arg in zip(artifact.inputs, args):
        if any(isinstance(d, str) for d in spec.shape):
            opt = list(arg.shape)
            low = [1 if isinstance(d, str) else d for d in spec.shape]
            high = [max(8, 4 * o) if isinstance(d, str) else d for d, o in zip(spec.shape, opt)]
            shapes[spec.name] = (low, opt, high)
    return shapes


def _prepare_tensorrt(onnx_artifact: Artifact, args: tuple, staging: Staging, torch_model, batches, source: str,
                      precision: str, check: bool) -> Artifact:
    """Readiness check and trtexec command for a verified ONNX artifact; the engine itself
    where tensorrt and a GPU exist (then verified), else the ONNX artifact says why not."""
    from edgeport.export.tensorrt import build_engine, check_readiness, trtexec_command

    readiness = check_readiness(onnx_artifact.path)
    shapes = _profile_shapes(onnx_artifact, args)
    command = trtexec_command(onnx_artifact.path, readiness, precision, shapes)
    script = onnx_artifact.path.with_suffix(".trtexec.sh")
    script.write_text(f"#!/bin/sh\n# Build the TensorRT engine on the device (written by edgeport)\n{command}\n")
    onnx_artifact.files.insert(0, script.name)
    onnx_artifact.settings["tensorrt"] = {"readiness": readiness.to_dict(), "trtexec": command, "profiles": shapes}
    if not readiness.ready:
        onnx_artifact.notes.append(readiness.summary())
        return onnx_artifact
    engine_path = onnx_artifact.path.with_suffix(".engine")
    try:
        build_engine(onnx_artifact.path, engine_path, precision, shapes or None)
    except BackendUnavailable as unavailable:
        onnx_artifact.settings["tensorrt"]["engine"] = f"not built here: {unavailable}"
        onnx_artifact.notes.append(f"TensorRT engine not built: {unavailable}; run {script.name} on the device")
        return onnx_artifact
    staging.commit(onnx_artifact)
    engine = Artifact(path=engine_path, format="tensorrt", precision=precision, inputs=onnx_artifact.inputs,
                      outputs=onnx_artifact.outputs, source_sha256=onnx_artifact.source_sha256,
                      exporter="tensorrt-api", files=[engine_path.name], settings={"onnx": onnx_artifact.path.name,
                                                                                    "profiles": shapes})
    if check:
        engine.parity = verify(engine, torch_model, batches, inputs_source=source)
    return engine


def export(model: str | torch.nn.Module, example: Example | None = None, targets: Sequence[str] = ("onnx",),
           out: str | Path = "build", *, name: str | None = None, weights: str | Path | None = None,
           verify_inputs: Sequence[Example] | None = None, check: bool = True, opset: int | None = None,
           dynamic_batch: bool = False, dynamic_axes: dict[str, dict[int, str]] | None = None,
           exporter: str = "auto", tolerance: Tolerance | None = None, snn_form: str | None = None,
           timesteps: int | None = None, sequence: bool = False, coreml_precision: str = "fp32",
           slim: bool = False, tensorrt_precision: str = "fp16", coreml_weights: str | None = None
           ) -> dict[str, Artifact]:
    """Export `model` to every target in `targets` under `out`, verifying each artifact.

    `example` is one input batch (a zoo model brings its own). Every artifact is verified
    against the torch model on `verify_inputs` (a sequence of batches; default: a zoo
    model's test images, else the example plus seeded random draws) unless `check=False`.
    A failed verification raises `CheckFailed` and leaves nothing behind in `out`.
    Spiking models export as `snn_form="unrolled"` (T steps in one graph) or `"step"` (one
    step, membranes as graph inputs and outputs) with `timesteps` T; `sequence=True` takes
    the input as (T, B, ...) instead of one frame repeated. Core ML packages are checked
    structurally everywhere and numerically where Core ML runs (macOS); the artifact's
    `settings["verification"]` says which; `coreml_weights` ("int8", "int4", "palettize4",
    "palettize6") compresses their weights. `targets=["tensorrt"]` writes the verified ONNX
    as `<name>-tensorrt.onnx` (a quantized model's in pure QDQ form; the `onnx` target's runs
    its matmuls as MatMulInteger) with a readiness report and the trtexec command, and the
    engine where tensorrt and a GPU exist. `slim=True` first turns pruning into a smaller
    dense model (see `edgeport.slim`) and verifies the artifact against the pruned model.
    Returns {target: Artifact}.
    """
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        close = difflib.get_close_matches(unknown[0], TARGETS, n=1) if unknown else []
        raise UserError(f"unknown target {unknown[0] if unknown else '(none)'!r}"
                        f"{'; did you mean ' + close[0] + '?' if close else ''}; available: {', '.join(TARGETS)}")
    torch_model, args = _model_and_example(model, example, weights)
    if snn_form is None:
        _run_reference(torch_model, args)
    if dynamic_batch:
        names = input_names(torch_model, len(args))
        dynamic_axes = {n: {0: "batch", **(dynamic_axes or {}).get(n, {})} for n in names} | \
            {k: v for k, v in (dynamic_axes or {}).items() if k not in names}
    name = name or (model if isinstance(model, str) and model in zoo.names() else type(torch_model).__name__.lower())
    if verify_inputs is None:
        verify_inputs, source = default_inputs(model, args)
    else:
        source = "given inputs"
    slim_report = None
    export_model = torch_model
    if slim:
        from edgeport.export.slim import slim as make_slim

        export_model, slim_report = make_slim(torch_model, args)
    form = None
    if snn_form is not None:
        steps = timesteps if timesteps is not None else getattr(torch_model, "timesteps", None)
        if steps is None:
            raise UserError("a spiking export needs timesteps (--timesteps T)")
        form = build_form(torch_model, args[0], snn_form, steps, sequence)
        name = f"{name}-{snn_form}"
    module, module_args = (form.module, form.args) if form else (export_model, args)
    io_names = {"names": form.input_names, "output_names": form.output_names} if form else {}
    artifacts = {}
    for target in targets:
        with Staging(out) as staging:
            if target in ("onnx", "tensorrt"):
                # The TensorRT form of a quantized model is pure QDQ (no MatMulInteger): its own file.
                file_name = name if target == "onnx" else f"{name}-tensorrt"
                artifact = export_onnx(module, module_args, staging.dir, file_name, opset=opset,
                                       dynamic_axes=dynamic_axes, exporter=exporter,
                                       precision=precision_of(export_model), integer_matmuls=target == "onnx",
                                       **io_names)
            else:
                artifact = export_coreml(module, module_args, staging.dir, name, precision=coreml_precision,
                                         weights=coreml_weights, **io_names)
            artifact.settings["source"] = model if isinstance(model, str) else type(torch_model).__name__
            if form:
                artifact.settings["snn"] = form.describe()
            if slim_report:
                artifact.settings["slim"] = {k: v for k, v in slim_report.__dict__.items()}
                artifact.notes.append(slim_report.summary())
            if check:
                artifact.parity = _check_numerics(artifact, torch_model, form, verify_inputs, source, tolerance)
                if artifact.parity is not None and not artifact.parity.passed:
                    worst = artifact.parity.failures()[0]
                    raise CheckFailed(f"{target} artifact fails verification: {worst.describe()}",
                                      artifact.parity)
            if target == "tensorrt":
                artifact = _prepare_tensorrt(artifact, module_args, staging, torch_model, verify_inputs, source,
                                             tensorrt_precision, check)
            artifacts[target] = staging.commit(artifact)
    return artifacts


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
               "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def profile_feeds(runner: OnnxRuntimeRunner, source: str | None, inputs: Sequence[Example] | None,
                  count: int = 16, batch: int | None = None) -> tuple[list[dict[str, np.ndarray]], str]:
    """Feeds for profiling: the given inputs, a zoo model's test images, or seeded random data
    shaped like the model's inputs (symbolic dims as 1, or `batch` for the first)."""
    specs = runner.session.get_inputs()
    if inputs is not None:
        feeds = _feeds([s.name for s in specs], inputs, None)
        return feeds, "given inputs"
    rows = batch or 1
    if source in zoo.names() and len(specs) == 1:
        images = zoo.testset(source)[0].numpy()
        return [{specs[0].name: images[i * rows:(i + 1) * rows]} for i in range(count)], f"{source} test images"
    generator = np.random.default_rng(0)
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            shape = [d if isinstance(d, int) else 1 for d in spec.shape]
            if shape and batch:
                shape[0] = batch
            dtype = _ORT_DTYPES.get(spec.type, np.float32)
            feed[spec.name] = (generator.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                               else generator.integers(0, 2, shape).astype(dtype))
        feeds.append(feed)
    return feeds, "seeded random inputs"


PROFILE_BACKENDS = ("onnxruntime", "torch", "torch-cuda")


def profile(target: str | Path | torch.nn.Module, backend: str = "onnxruntime", device: str = "host", *,
            runs: int = 200, warmup: int = 20, warmup_s: float = 0.0, min_duration_s: float = 0.0,
            threads: int | None = None, sessions: int = 5, inputs: Sequence[Example] | None = None,
            ops: bool = True, energy: bool = True, energy_window_s: float = 1.0, idle_s: float = 1.0,
            batch_sizes: Sequence[int] = (), rapl_root: str | Path = "/sys/class/powercap",
            hwmon_root: str | Path = "/sys/class/hwmon", label: str = "") -> Profile:
    """Measure on this machine: latency statistics (ms), per-op breakdown, energy per inference
    (mJ) where a meter exists, and (for ONNX artifacts) the host's roofline estimate beside it.

    `target` is an ONNX artifact for backend "onnxruntime", or a model (module, zoo name, .pt2,
    package.module:factory) for "torch" and "torch-cuda" (then `inputs` are needed unless it
    is a zoo model). The runs are spread over `sessions` fresh sessions, so that the median's
    confidence interval covers session-to-session variation, not only sampling noise.
    `batch_sizes` adds throughput (items/s) at those batch sizes when the batch axis is symbolic.
    """
    from edgeport.devices import catalog
    from edgeport.devices.estimate import estimate as roofline
    from edgeport.runtime.opprofile import profile_onnxruntime, profile_torch
    from edgeport.runtime.profile import profile_runner

    if device != "host":
        catalog.get(device)  # an unknown name gets its suggestions first
        raise UserError(f"profiling measures on this machine (device 'host'); for {device} use `estimate`")
    if backend not in PROFILE_BACKENDS:
        raise UserError(f"unknown profiling backend {backend!r}; available: {', '.join(PROFILE_BACKENDS)}")
    if runs <= 0 or warmup < 0:
        raise UserError(f"runs must be positive and warm-up non-negative (got runs={runs}, warmup={warmup})")
    gc.collect()  # sessions the caller dropped still spin until collected
    common = dict(runs=runs, warmup=warmup, warmup_s=warmup_s, min_duration_s=min_duration_s, sessions=sessions,
                  energy=energy, energy_window_s=energy_window_s, idle_s=idle_s, rapl_root=rapl_root,
                  hwmon_root=hwmon_root, threads=threads, label=label, device=device, backend=backend)
    if backend != "onnxruntime":
        model = load_model(target)
        example = zoo.example(target) if isinstance(target, str) and target in zoo.names() else None
        if inputs is None and example is None:
            raise UserError("profiling a torch model needs inputs (only zoo models bring their own)")
        names = input_names(model, len(as_args(inputs[0] if inputs is not None else example)))
        if inputs is None:
            images = zoo.testset(target)[0]
            feeds, source = [{names[0]: images[i:i + 1].numpy()} for i in range(16)], f"{target} test images"
        else:
            feeds, source = _feeds(names, inputs, None), "given inputs"
        run_on = "cuda" if backend == "torch-cuda" else "cpu"
        return profile_runner(
            lambda: TorchRunner(model, names, device=run_on).load(), feeds, str(target) if isinstance(target, str)
            else type(model).__name__, source, gpu=run_on == "cuda",
            op_profiler=(lambda: profile_torch(model, names, feeds, runs=min(runs, 50))) if ops and run_on == "cpu"
            else None, **common)
    path = Path(target)
    if not path.is_file():
        raise UserError(f"artifact {path} does not exist")
    try:
        source_model = Artifact.load(path).settings.get("source")
    except UserError:
        source_model = None  # a plain .onnx without a sidecar profiles as well
    probe = OnnxRuntimeRunner(path, threads=threads).load()
    feeds, source = profile_feeds(probe, source_model, inputs)
    symbolic_batch = all(not isinstance(s.shape[0], int) for s in probe.session.get_inputs() if s.shape)
    batch_feeds = {size: profile_feeds(probe, source_model, None, count=4, batch=size)[0] for size in batch_sizes
                   if size != 1 and symbolic_batch and inputs is None}
    probe.close()
    return profile_runner(
        lambda: OnnxRuntimeRunner(path, threads=threads).load(), feeds, str(path), source, gpu=False,
        op_profiler=(lambda: profile_onnxruntime(path, feeds, runs=min(runs, 50), threads=threads)) if ops else None,
        estimate=roofline(path, "host"), batch_feeds=batch_feeds, **common)


def estimate(artifact: str | Path, device: str = "host", **options):
    """Roofline latency (ms) and energy (mJ, estimated) of an ONNX artifact on a catalog device."""
    from edgeport.devices.estimate import estimate as roofline

    path = Path(artifact)
    if not path.is_file():
        raise UserError(f"artifact {path} does not exist")
    return roofline(path, device, **options)


def spike_statistics(model: str | torch.nn.Module, inputs: torch.Tensor | None = None, timesteps: int | None = None,
                     *, weights: str | Path | None = None, sequence: bool = False):
    """Firing rates per neuron layer, synaptic operations per weight layer, and the 45 nm
    energy (mJ per sample, labelled estimated) of a spiking model beside its ANN equivalent.

    `inputs` is a batch of real samples (default: 32 calibration images of a zoo model); the
    model runs `timesteps` steps (default: its `timesteps` attribute). A model without
    spiking neurons is measured as an ANN (all MACs).
    """
    from edgeport.snn.stats import spike_statistics as measure_spikes

    torch_model = load_model(model, weights)
    if inputs is None:
        if not (isinstance(model, str) and model in zoo.names()):
            raise UserError("spike statistics need inputs (a batch of real samples); only zoo models bring their own")
        inputs = zoo.calibration(model, 32)
    steps = timesteps if timesteps is not None else getattr(torch_model, "timesteps", None)
    if steps is None:
        return measure_spikes(torch_model, inputs)
    form = build_form(torch_model, inputs, "unrolled", steps, sequence)
    return measure_spikes(form.module, inputs)


def slim(model: str | torch.nn.Module, example: Example | None = None, *, weights: str | Path | None = None):
    """A smaller dense model computing the same function as the pruned `model`, and the
    report (channels and heads removed, MACs and parameters before and after, what was kept
    and why, unstructured sparsity and what each backend does with it).

    Masks from `torch.nn.utils.prune` are baked first; a model with nothing to remove comes
    back unchanged with a report that says so.
    """
    from edgeport.export.slim import slim as make_slim

    torch_model, args = _model_and_example(model, example, weights)
    _run_reference(torch_model, args)
    return make_slim(torch_model, args)


def quantize(model: str | torch.nn.Module, calib: torch.Tensor | None = None, method: str = "repq", w_bits: int = 8,
             a_bits: int = 8, *, target: str = "onnxruntime", weights: str | Path | None = None,
             keep_8bit: Sequence[str] = (), act_observer: str | None = None) -> torch.nn.Module:
    """A fake-quantized copy of `model` (post-training, `method` "minmax", "percentile" or
    "repq"), calibrated on `calib` (a batch of real samples; a zoo model brings 32 training
    images). `ep.export` turns it into quantized ONNX (QuantizeLinear and integer matmuls for
    ONNX Runtime, pure QDQ for the `tensorrt` target); `target="tensorrt"` makes it symmetric.
    Layers named in `keep_8bit` stay at 8 bits; `act_observer` ("minmax", "percentile",
    "mse", "entropy") overrides the method's activation calibration. The pipeline's report is
    the returned module's `quant_report` attribute.
    """
    from edgeport.quant.ptq import quantize as run_ptq

    torch_model = load_model(model, weights)
    if calib is None:
        if not (isinstance(model, str) and model in zoo.names()):
            raise UserError("quantization needs calibration data (about 32 real samples); only zoo models bring their own")
        calib = zoo.calibration(model, 32)
    qmodel, report = run_ptq(torch_model, calib, method, w_bits, a_bits, target=target, keep_8bit=tuple(keep_8bit),
                             act_observer=act_observer)
    qmodel.quant_report = report
    return qmodel
