"""One Runner per backend, all with the same interface: `load()`, `infer(feeds) -> outputs`.

Feeds and outputs are dicts from tensor name to numpy array. A backend that cannot run
here raises `BackendUnavailable` with the reason and the remedy — never a silent skip.
"""
from __future__ import annotations

import gc
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from edgeport.errors import BackendUnavailable, UserError


class Runner(ABC):
    """A loaded model that maps named numpy inputs to named numpy outputs."""

    name: str = "runner"
    device: str = "cpu"
    input_names: list[str]
    output_names: list[str]

    @abstractmethod
    def load(self) -> "Runner":
        """Prepare the backend (open a session, move weights); returns self."""

    @abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference; `feeds` must hold every input name."""

    def close(self) -> None:
        """Release what `load` acquired (sessions, device memory)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device!r})"


class TorchRunner(Runner):
    """A torch module run eagerly under `torch.inference_mode`, on CPU or CUDA.

    Outputs are the module's outputs flattened in pytree order (tuples, dicts and
    `transformers` ModelOutputs alike), the same order both ONNX exporters use.
    """

    def __init__(self, model: torch.nn.Module, input_names: list[str], output_names: list[str] | None = None,
                 device: str = "cpu"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("torch-cuda", "no CUDA device is visible to torch",
                                     "run on a machine with an NVIDIA GPU and a CUDA build of torch")
        self.model, self.input_names, self.device = model, list(input_names), device
        self.output_names = list(output_names or [])
        self.name = "torch" if device == "cpu" else f"torch-{device}"

    def load(self) -> "TorchRunner":
        self.model = in_eval_mode(self.model).to(self.device)
        return self

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.input_names]
        with torch.inference_mode():
            flat = flatten_outputs(self.model(*args))
        if not self.output_names:
            self.output_names = [f"output_{i}" for i in range(len(flat))]
        if len(flat) != len(self.output_names):
            raise UserError(f"the model returned {len(flat)} outputs, expected {len(self.output_names)}")
        return {n: t.detach().cpu().numpy() for n, t in zip(self.output_names, flat)}


def in_eval_mode(model: torch.nn.Module) -> torch.nn.Module:
    """`model.eval()`, except for torch.export modules, which are inference graphs already
    and refuse the call."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def flatten_outputs(outputs) -> list[torch.Tensor]:
    """The tensors of a model's output structure, in pytree order (non-tensors dropped)."""
    leaves, _ = torch.utils._pytree.tree_flatten(outputs)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime session on the providers actually available here (CPU unless told).

    `threads` sets intra-op threads (None: ORT's default). `spinning=False` stops idle
    worker threads from busy-waiting, which matters when another session is being timed
    in the same process.
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 spinning: bool = True):
        self.path, self.threads, self.spinning = Path(path), threads, spinning
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


class StreamingRunner(Runner):
    """A step-form spiking artifact run one timestep at a time, its state kept between calls.

    `reset(batch)` starts every state at the value the sidecar records; `infer({"x": x_t})`
    runs one step and returns the model outputs (the state stays inside). `set_state` takes
    states from elsewhere (another device, a checkpoint) and checks their shapes.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        from edgeport.export.artifact import Artifact

        self.artifact = Artifact.load(path)
        self.snn = self.artifact.settings.get("snn") or {}
        if self.snn.get("form") != "step":
            raise UserError(f"{path} is not a step-form spiking artifact (export it with snn_form='step')")
        self.runner = OnnxRuntimeRunner(path, threads=threads)
        self.name, self.state = "onnxruntime-streaming", []

    def load(self) -> "StreamingRunner":
        self.runner.load()
        self.input_names = self.runner.input_names[:1]
        self.output_names = self.snn["outputs"]
        return self.reset()

    def _state_specs(self):
        return [spec for spec in self.artifact.inputs if spec.name in self.snn["state_inputs"]]

    def reset(self, batch: int = 1) -> "StreamingRunner":
        """Every state back to its initial value, for `batch` streams."""
        self.state = [np.full([batch, *spec.shape[1:]], value, dtype=np.float32)
                      for spec, value in zip(self._state_specs(), self.snn["initial_state_values"])]
        return self

    def set_state(self, state: list[np.ndarray]) -> None:
        """Replace the state; each tensor must have the shape the step model declares."""
        specs = self._state_specs()
        if len(state) != len(specs):
            raise UserError(f"the step model has {len(specs)} state tensors, {len(state)} were given")
        for spec, given in zip(specs, state):
            expected = [d for d in spec.shape]
            if list(given.shape[1:]) != expected[1:] or (isinstance(expected[0], int) and given.shape[0] != expected[0]):
                raise UserError(f"state {spec.name!r} has shape {list(given.shape)}, the step model needs {expected}")
        self.state = [np.asarray(s, dtype=np.float32) for s in state]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = list(self.runner.infer(dict(zip(self.runner.input_names, [next(iter(feeds.values())), *self.state])))
                       .values())
        count = len(self.output_names)
        self.state = results[count:]
        return dict(zip(self.output_names, results[:count]))

    def close(self) -> None:
        self.runner.close()


class CoreMLRunner(Runner):
    """A Core ML package run by Core ML itself; only macOS has that runtime."""

    def __init__(self, path: str | Path, compute_units: str = "ALL"):
        self.path, self.compute_units = Path(path), compute_units
        self.name, self.model = "coreml", None

    def load(self) -> "CoreMLRunner":
        import platform

        if platform.system() != "Darwin":
            raise BackendUnavailable("coreml", f"Core ML predicts only on macOS; this is {platform.system()}",
                                     "verify and profile the package on a Mac")
        import coremltools as ct

        self.model = ct.models.MLModel(str(self.path), compute_units=getattr(ct.ComputeUnit, self.compute_units))
        spec = self.model.get_spec()
        self.input_names = [f.name for f in spec.description.input]
        self.output_names = [f.name for f in spec.description.output]
        self.device = f"coreml-{self.compute_units.lower()}"
        return self

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.model.predict({n: feeds[n] for n in self.input_names})
        return {n: np.asarray(result[n]) for n in self.output_names}


def runner_for(path: str | Path, format: str, threads: int | None = None) -> Runner:
    """An unloaded runner for an artifact file of the given format ('onnx' or 'coreml').

    Verification sessions do not spin: they would distort timings taken beside them.
    """
    if format == "onnx":
        return OnnxRuntimeRunner(path, threads=threads, spinning=False)
    if format == "coreml":
        return CoreMLRunner(path)
    if format == "tensorrt":
        return TensorRTRunner(path)
    raise UserError(f"no runner for {format!r} artifacts here")


class TensorRTRunner(Runner):
    """A serialized TensorRT engine run through the tensorrt API on the GPU (torch holds the
    device buffers). Raises `BackendUnavailable` without tensorrt or a CUDA device."""

    def __init__(self, path: str | Path):
        self.path, self.name, self.device = Path(path), "tensorrt", "cuda"

    def load(self) -> "TensorRTRunner":
        from edgeport.export.tensorrt import tensorrt_module

        trt = tensorrt_module()
        if not torch.cuda.is_available():
            raise BackendUnavailable("tensorrt", "no CUDA device is visible", "run on a machine with an NVIDIA GPU")
        self.trt = trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError(f"{self.path} is not a TensorRT engine for this GPU and TensorRT version")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        return self

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = []
        for name in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        outputs = {}
        for name in self.output_names:
            dtype = torch.from_numpy(np.zeros(0, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return {n: t.cpu().numpy() for n, t in outputs.items()}
