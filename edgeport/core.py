"""The core objects every stage shares; this module imports no stage.

- `Artifact`: a file on disk plus its `*.edgeport.json` sidecar, written atomically through
  `Staging` (exporters write into a staging folder inside the output folder; only after the
  artifact has been verified does `Staging.commit` move it into place);
- `Tolerance`, `OutputParity`, `ParityReport`: what a verification decided and why;
- `Runner`: the one interface every backend's runtime implements, and `TorchRunner`, the
  reference every artifact is compared against;
- `Source` and the feeds policy: the model, its example and the inputs made for it, with one
  rule for dtypes and value ranges (token ids within the vocabulary, masks 0/1) and one size
  limit checked before anything is allocated.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edgeport.errors import BackendUnavailable, UserError, byte_size, limit_from_environment

SIDECAR_SUFFIX = ".edgeport.json"


@dataclass
class Tolerance:
    """What an output must satisfy; `why` says where the numbers come from."""

    kind: str  # "relative-to-scale" | "cosine" | "exact"
    max_error: float = 0.0  # relative to the output scale, for "relative-to-scale"
    min_cosine: float = 0.0
    min_sqnr_db: float = 0.0
    why: str = ""

    def short(self) -> str:
        """The rule in a few characters, for tables."""
        if self.kind == "exact":
            return "exact"
        if self.kind == "cosine":
            return f"cos>={self.min_cosine:g}, SQNR>={self.min_sqnr_db:g}dB"
        return f"rel<={self.max_error:g}"


TOLERANCES = {
    "fp32": Tolerance("relative-to-scale", max_error=1e-4, why="fp32: max abs error <= 1e-4 x max|reference|"),
    "fp16": Tolerance("relative-to-scale", max_error=1e-2, why="fp16: max abs error <= 1e-2 x max|reference|"),
    "int8": Tolerance("cosine", min_cosine=0.99, min_sqnr_db=15.0,
                      why="int8: judged by cosine >= 0.99 and SQNR >= 15 dB, not atol"),
    "int4": Tolerance("cosine", min_cosine=0.9, min_sqnr_db=5.0,
                      why="sub-8-bit: judged by cosine >= 0.9 and SQNR >= 5 dB, not atol"),
    "exact": Tolerance("exact", why="bool/integer output: must be identical"),
}


# An fp32 or fp16 output that fails its fixed tolerance still passes if its error is within
# this many times the error torch itself makes computing the same model at that precision,
# against float64 (see `edgeport.sdk._judge_by_noise_floor`): two correct computations of a
# model at one precision differ by about that model's rounding noise, whatever its size.
NOISE_FLOOR_MULTIPLE = 10
# ... but never beyond these: past them, rounding noise swamps what a check could find. fp32's
# cap is fp16's fixed bound; fp16's is ten times that (a model whose own fp16 run is already 1 %
# off: the interpreter's fp16 may reorder what torch's does, and each order rounds differently).
NOISE_FLOOR_CAP = {"fp32": 1e-2, "fp16": 1e-1}


def tolerance_for(precision: str, dtype: np.dtype) -> Tolerance:
    """The default tolerance for one output of an artifact of the given precision."""
    if dtype == np.bool_ or np.issubdtype(dtype, np.integer):
        return TOLERANCES["exact"]
    if precision in TOLERANCES:
        return TOLERANCES[precision]
    if precision.startswith(("w8", "int8")):
        return TOLERANCES["int8"]
    if precision.startswith(("w", "int")):
        return TOLERANCES["int4"]
    return TOLERANCES["fp16" if dtype == np.float16 else "fp32"]


@dataclass
class OutputParity:
    """Errors of one output over all compared samples, and the verdict."""

    name: str
    shape: list[int]
    max_abs_error: float
    max_rel_error: float  # max abs error / output scale
    scale: float  # max |reference|
    cosine: float
    sqnr_db: float
    mismatched: int  # elements that differ at all (what counts for exact outputs)
    tolerance: Tolerance
    passed: bool

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        vacuous = ("; the reference is zero on every input, so this proves nothing of the weights: verify on "
                   "inputs that make it non-zero (a spiking net that fires)") if self.scale == 0 else ""
        return (f"{self.name}: {verdict} max abs {self.max_abs_error:.3g} (scale {self.scale:.3g}, "
                f"rel {self.max_rel_error:.3g}), cosine {self.cosine:.6f}, SQNR {self.sqnr_db:.1f} dB "
                f"[{self.tolerance.why}]{vacuous}")


@dataclass
class ParityReport:
    """Per-output parity between a reference and a candidate runner on the same inputs."""

    reference: str
    candidate: str
    samples: int
    inputs_source: str
    outputs: list[OutputParity] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def failures(self) -> list[OutputParity]:
        return [o for o in self.outputs if not o.passed]

    def summary(self) -> str:
        head = f"parity {self.candidate} vs {self.reference} on {self.samples} samples ({self.inputs_source})"
        return "\n".join([head + (": passed" if self.passed else ": FAILED")] +
                         ["  " + o.describe() for o in self.outputs])

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    @classmethod
    def from_dict(cls, data: dict) -> "ParityReport":
        outputs = [OutputParity(**{**o, "tolerance": Tolerance(**o["tolerance"])}) for o in data["outputs"]]
        return cls(data["reference"], data["candidate"], data["samples"], data["inputs_source"], outputs)


@dataclass
class TensorSpec:
    """A graph input or output: name, shape (ints, or strings for symbolic dims), dtype."""

    name: str
    shape: list
    dtype: str


@dataclass
class Artifact:
    """An exported model file and everything known about how it was made and checked."""

    path: Path
    format: str  # "onnx", "coreml", "tensorrt"
    precision: str  # "fp32", "fp16", "int8", "w4a4", ...
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source_sha256: str
    exporter: str  # the path actually taken, e.g. "torch.export" or "legacy-torchscript"
    opset: int | None = None
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. why the fallback was taken
    files: list[str] = field(default_factory=list)  # every file that belongs to the artifact
    parity: ParityReport | None = None
    edgeport_version: str = ""
    created: str = ""
    file_sha256: dict[str, str] = field(default_factory=dict)  # as committed: what was verified

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + SIDECAR_SUFFIX)

    def member_files(self) -> list[Path]:
        """Every file of the artifact that exists now, sidecar aside: its listed files, a
        folder's (a Core ML package's) files one by one."""
        members = []
        for name in dict.fromkeys([*self.files, self.path.name]):
            path = self.path.parent / name
            members += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] * path.is_file()
        return members

    def digests(self) -> dict[str, str]:
        """sha256 of each of the artifact's files as they are now, by path relative to its folder."""
        digests = {}
        for member in self.member_files():
            with member.open("rb") as stream:
                digest = hashlib.file_digest(stream, "sha256").hexdigest()
            digests[member.relative_to(self.path.parent).as_posix()] = digest
        return digests

    def changed_files(self) -> list[str]:
        """The files that differ from the ones committed (changed, missing or added since the
        export verified them); empty for an older sidecar that recorded none."""
        if not self.file_sha256:
            return []
        now = self.digests()
        return sorted(name for name in set(now) | set(self.file_sha256) if now.get(name) != self.file_sha256.get(name))

    def summary(self) -> str:
        """A few lines: the file and how it was made, its inputs and outputs, its parity verdict
        (or that it was not checked), and its notes."""
        def specs(items: list[TensorSpec]) -> str:
            return ", ".join(f"{t.name} {'x'.join(map(str, t.shape))} {t.dtype}" for t in items)

        made = f"{self.format} {self.precision}, {self.exporter}" + (f", opset {self.opset}" if self.opset else "")
        verdict = self.parity.summary().splitlines()[0] if self.parity else "parity not checked"
        return "\n".join([f"{self.path} ({made})", f"  inputs: {specs(self.inputs)}",
                          f"  outputs: {specs(self.outputs)}", f"  {verdict}", *(f"  note: {n}" for n in self.notes)])

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["parity"] = self.parity.to_dict() if self.parity else None
        return data

    def write_sidecar(self) -> Path:
        from edgeport import __version__

        self.edgeport_version = __version__
        self.created = self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.file_sha256 = self.digests()
        data = self.to_dict()
        data["path"] = self.path.name  # relative: the folder may be moved
        self.sidecar.write_text(json.dumps(data, indent=2) + "\n")
        return self.sidecar

    @classmethod
    def load(cls, path: str | Path) -> "Artifact":
        """Read an artifact's sidecar; `path` is the artifact file (or the sidecar itself)."""
        path = Path(path)
        if path.name.endswith(SIDECAR_SUFFIX):
            path = path.with_name(path.name[: -len(SIDECAR_SUFFIX)])
        sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
        if not path.exists():
            raise UserError(f"artifact {path} does not exist")
        if not sidecar.exists():
            raise UserError(f"{path} has no {SIDECAR_SUFFIX} sidecar; was it exported by edgeport?")
        try:
            data = json.loads(sidecar.read_text())
            data["path"] = path
            data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
            data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
            data["parity"] = ParityReport.from_dict(data["parity"]) if data.get("parity") else None
            return cls(**data)
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"corrupt sidecar {sidecar}: {error}") from error


STAGING_PREFIX = ".edgeport-staging-"
_stop_signal: int | None = None  # the signal the process was told to stop by, once it was


def stop(signum: int) -> None:
    """Unwind the process for signal `signum` (the CLI's SIGTERM handler): raise
    SystemExit(128 + signum), and remember it. A signal handler raises wherever the main thread
    is, and where that is a `__del__` or a library's catch-all the exception is only printed
    and the work runs on (1 in 8 runs of the SIGTERM test committed and exited 0): the next
    commit raises it again (`exit_if_stopped`), so nothing is committed after a stop."""
    global _stop_signal
    _stop_signal = signum
    raise SystemExit(128 + signum)


def stopped_by() -> int | None:
    """The signal `stop` was called for, or None: a library that catches the SystemExit and
    raises its own (Ray's `wait` turns it into SystemExit(1)) loses the code, this keeps it."""
    return _stop_signal


def exit_if_stopped() -> None:
    """Raise SystemExit(128 + signum) again where `stop` was called: a step that commits files
    calls it first, so that a stop some library swallowed on the way commits nothing."""
    if _stop_signal is not None:
        raise SystemExit(128 + _stop_signal)


def remove_path(path: Path) -> None:
    """Delete a file, a link or a folder (a Core ML package is one); nothing where there is none."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def check_artifact_name(name: str) -> str:
    """An artifact name is a file name: refuse separators, `..`, absolute paths, control
    characters and names a shell or a file system would mangle, so nothing lands outside the
    output folder."""
    if not isinstance(name, str) or not name.strip():
        raise UserError("an artifact name must be a non-empty file name")
    bad = [c for c in name if ord(c) < 32 or ord(c) == 127]
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith(("..", ".", "-")) or bad \
            or os.path.isabs(name) or len(name.encode()) > 200:
        raise UserError(f"artifact name {name!r} is not a plain file name (no path separators, no leading "
                        f"'.' or '-', no control characters, at most 200 bytes)")
    return name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_staging(out: Path) -> list[str]:
    """Remove staging folders in `out` left by edgeport processes that no longer run (killed
    mid-export); returns their names. A folder of a live process is left alone."""
    swept = []
    for folder in out.glob(STAGING_PREFIX + "*"):
        pid = folder.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if folder.is_dir() and not folder.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(folder.name)
    return swept


class Staging:
    """A temporary folder inside `out` whose files move into `out` only on `commit()`.

    Use as a context manager: leaving the block without committing (an exception, Ctrl-C, or
    SIGTERM, which the CLI turns into an exception) deletes the folder and everything in it.
    The folder's name carries the process id, so the next export into `out` removes folders
    of processes that were killed outright.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        # the topmost folder this export creates: removed again if nothing is committed
        self.created = next((p for p in [*reversed(self.out.parents), self.out] if not p.exists()), None)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            sweep_stale_staging(self.out)
            self.dir = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.out))
        except OSError as error:
            raise UserError(f"cannot write to output folder {self.out}: {error.strerror}") from error

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.created is not None and not any(self.out.iterdir()):
            for folder in [self.out, *self.out.parents]:  # only the empty folders this export made
                folder.rmdir()
                if folder == self.created:
                    break

    def _replaceable(self, artifact: Artifact) -> set[str]:
        """Names in `out` that a previous export of this artifact wrote (listed in its sidecar)."""
        previous = self.out / artifact.sidecar.name
        if not previous.is_file() or previous.is_symlink():
            return set()
        try:
            data = json.loads(previous.read_text())
            return {previous.name, str(data["path"]), *map(str, data.get("files", []))}
        except (OSError, ValueError, KeyError, TypeError):
            return set()

    def commit(self, *artifacts: Artifact) -> list[Artifact]:
        """Move the artifacts' files and sidecars into `out` (each by an atomic rename). A name
        in `out` is replaced only if an earlier edgeport export wrote it; anything else there
        (a user's file or folder) stops the commit before anything moves."""
        exit_if_stopped()
        moves = []
        for artifact in artifacts:
            sidecar = artifact.write_sidecar()
            names = list(dict.fromkeys([*artifact.files, artifact.path.name, sidecar.name]))  # sidecar last
            owned = self._replaceable(artifact)
            for name in names:
                target = self.out / name
                if (target.exists() or target.is_symlink()) and name not in owned:
                    raise UserError(f"refusing to overwrite {target}: it was not written by an edgeport export "
                                    f"(move it away, or name the artifact otherwise: --name, name=)")
                moves.append((self.dir / name, target))
        for staged, target in moves:
            remove_path(target)
            os.replace(staged, target)
        for artifact in artifacts:
            artifact.path = self.out / artifact.path.name
        return list(artifacts)


class Runner(ABC):
    """A loaded model that maps named numpy inputs to named numpy outputs (one per backend)."""

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


def forward_parameters(model: torch.nn.Module, positional: bool = True) -> list[str]:
    """The names of the forward's parameters, in order (a TorchScript module's from its
    compiled schema): the positional ones, or with `positional=False` every one a keyword can
    name (keyword-only ones too; `*args` and `**kwargs` are no names). Empty where the
    forward has no signature to read."""
    schema = getattr(getattr(model, "forward", None), "schema", None)
    if schema is not None:
        return [a.name for a in schema.arguments[1:]]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) + (
        () if positional else (inspect.Parameter.KEYWORD_ONLY,))
    try:
        return [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    except (TypeError, ValueError):
        return []


def input_names(model: torch.nn.Module, count: int) -> list[str]:
    """Names for the first `count` positional inputs: the forward's parameter names (a
    TorchScript module's from its compiled schema; a `KeywordInputs`' the names it passes)."""
    params = forward_parameters(model)
    return [params[i] if i < len(params) else f"input_{i}" for i in range(count)]


class KeywordInputs(torch.nn.Module):
    """`model` called by keyword: the forward takes the tensors named `names` positionally, in
    that order, and passes each to the model's parameter of that name, every other parameter
    keeping its default. Exporters, runners and verification call a module positionally, and
    a Hugging Face forward does not take its inputs in the order users name them (GPT-2's
    `attention_mask` comes third, after the cache). Build one with `KeywordInputs.of`.

    The model is the one child, `model`: module paths read `model.<its own path>`. The
    source hash (`source_sha256`) is the model's own, as if it had been called directly."""

    names: tuple[str, ...] = ()

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def of(cls, model: torch.nn.Module, names: Sequence[str]) -> "KeywordInputs":
        """The wrapper of `model` taking `names`: a class of its own, whose forward's signature
        lists those names (torch.export binds positional inputs, and their dynamic shapes, to
        the names it reads there; `input_names` reads them too)."""
        def forward(self, *tensors: torch.Tensor):
            return self.model(**dict(zip(self.names, tensors)))

        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("self", *names)])
        named = type(cls.__name__, (cls,), {"names": tuple(names), "forward": forward,
                                            "__qualname__": cls.__qualname__, "__module__": cls.__module__})
        return named(model)


@contextlib.contextmanager
def torch_logs_silenced(*names: str):
    """The `torch` loggers (and any others named) quiet for the block: a failed torch.export
    logs its fake-tensor traceback as a page of ERROR lines on stderr, although the exception
    it raises, which the caller reports or turns into a note, says the same once."""
    loggers = [logging.getLogger(n) for n in ("torch", *names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def capture(model: torch.nn.Module, args: tuple) -> torch.export.ExportedProgram:
    """The graph torch.export captures of `model` called on `args` (non-strict, as the
    analyses that read a model's graph need it), with torch's log noise silenced; raises
    what torch.export raises."""
    with torch_logs_silenced():
        return torch.export.export(model, tuple(args), strict=False)


def source_sha256(model: torch.nn.Module) -> str:
    """A hash of the model's class and every parameter and buffer (names, dtypes, shapes, bytes)."""
    while isinstance(model, KeywordInputs):  # the model's own hash: the wrapper holds no weights
        model = model.model
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# --- inputs: one policy for every feed edgeport makes -------------------------------------

# Bytes one input batch may take before anything is allocated; `edgeport --max-input-bytes`
# or `EDGEPORT_MAX_INPUT_BYTES` raises it for a model that really needs more.
MAX_INPUT_BYTES = limit_from_environment("EDGEPORT_MAX_INPUT_BYTES", 1 << 30)
# The most a model file may unpack to: the sizes its zip entries declare, the tensors torch
# builds from declared shapes alone, a NIR file's datasets. `EDGEPORT_MAX_MODEL_BYTES` raises it.
MAX_MODEL_BYTES = limit_from_environment("EDGEPORT_MAX_MODEL_BYTES", 4 << 30)
DEFAULT_VOCABULARY = 100  # token ids drawn below this when the model has no embedding to ask


def check_input_size(name: str, shape: Sequence[int], dtype: np.dtype | torch.dtype) -> None:
    """Refuse an input whose every dimension is not positive, or that would take more than
    `MAX_INPUT_BYTES` bytes, before it is allocated."""
    if any(not isinstance(d, (int, np.integer)) or d <= 0 for d in shape):
        raise UserError(f"input {name!r} has shape {list(shape)}: every dimension must be a positive integer")
    itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else np.dtype(dtype).itemsize
    size = math.prod(int(d) for d in shape) * itemsize
    if size > MAX_INPUT_BYTES:
        raise UserError(f"input {name!r} of shape {'x'.join(map(str, shape))} would take {byte_size(size)}, "
                        f"over the {byte_size(MAX_INPUT_BYTES)} limit (raise it with --max-input-bytes)")


def check_model_size(what: str, size: int) -> None:
    """Refuse a model whose files would unpack to more than `MAX_MODEL_BYTES` bytes (`size`),
    before anything is unpacked; `what` names it in the message."""
    if size > MAX_MODEL_BYTES:
        raise UserError(f"{what} would take {byte_size(size)}, over the {byte_size(MAX_MODEL_BYTES)} "
                        f"limit (raise it with the environment variable EDGEPORT_MAX_MODEL_BYTES)")


def second_size_feeds(model: torch.nn.Module, args: tuple, names: list[str], dynamic_axes: dict,
                      ranges: dict[str, tuple[int, int]] | None = None
                      ) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
    """Feeds at another size of every dynamic axis than the example's (three more, or three
    fewer where `ranges`, {symbol: (low, high)}, end below that), drawn like the example (token
    ids, masks 0/1), and the size chosen per symbol."""
    sizes = {}
    for name, arg in zip(names, args):
        for axis, symbol in dynamic_axes.get(name, {}).items():
            low, high = (ranges or {}).get(symbol, (1, math.inf))
            sizes[symbol] = arg.shape[axis] + 3 if arg.shape[axis] + 3 <= high else max(low, arg.shape[axis] - 3)
    rng, vocabulary, feeds = np.random.default_rng(2), vocabulary_size(model), {}
    for name, arg in zip(names, args):
        shape = [sizes[dynamic_axes[name][axis]] if axis in dynamic_axes.get(name, {}) else size
                 for axis, size in enumerate(arg.shape)]
        feeds[name] = draw_input(name, shape, arg.numpy().dtype, rng, like=arg.numpy(), vocabulary=vocabulary)
    return [feeds], sizes


def vocabulary_size(model: torch.nn.Module | None) -> int | None:
    """The number of rows of the model's first embedding table: the range of its token ids."""
    if model is None:
        return None
    embedding = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return embedding.num_embeddings if embedding is not None else None


@dataclass(frozen=True)
class ImageRange:
    """How a model takes images: `(pixel - mean) / std` per channel for pixels in [0, 1];
    `why` says what chose it."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    why: str = ""

    def present(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels in [0, 1], shaped (N, C, H, W), as this range presents them to the model."""
        channels = pixels.shape[1]
        mean, std = ((np.array(v) if len(v) == channels else np.full(channels, np.mean(v))).reshape(1, -1, 1, 1)
                     for v in (self.mean, self.std))
        return (pixels - mean) / std


IMAGE_RANGES = (ImageRange("pixels in [0, 1]", (0.0,), (1.0,)),
                ImageRange("pixels in [-1, 1]", (0.5,), (0.5,)),
                ImageRange("ImageNet mean/std normalization", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                ImageRange("pixels in [0, 255]", (0.0,), (1 / 255,)))


def is_image(shape: Sequence[int], dtype: np.dtype | torch.dtype) -> bool:
    """A float input shaped (N, C, H, W) with 1, 3 or 4 channels and at least 8x8 pixels."""
    floating = dtype.is_floating_point if isinstance(dtype, torch.dtype) else np.issubdtype(dtype, np.floating)
    return floating and len(shape) == 4 and shape[1] in (1, 3, 4) and min(shape[2:]) >= 8


def natural_images(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Seeded images with the statistics of photographs rather than of white noise: a 1/f
    amplitude spectrum (smooth regions, edges at every scale), channels mostly shared (colour
    channels of photographs correlate), each image spanning pixels 0 to 1. Shape (N, C, H, W)."""
    n, channels, height, width = shape
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(height), np.fft.rfftfreq(width), indexing="ij"))
    amplitude = np.divide(1.0, frequency, out=np.zeros_like(frequency), where=frequency > 0)
    spectrum = amplitude * (rng.standard_normal((n, channels + 1, *frequency.shape))
                            + 1j * rng.standard_normal((n, channels + 1, *frequency.shape)))
    planes = np.fft.irfft2(spectrum, s=(height, width))
    images = 0.8 * planes[:, :1] + 0.2 * planes[:, 1:]  # a shared luminance plus each channel's own
    low, high = images.min(axis=(1, 2, 3), keepdims=True), images.max(axis=(1, 2, 3), keepdims=True)
    return (images - low) / np.maximum(high - low, 1e-12)


class _FirstNorm(Exception):
    """Stops a forward pass at the first BatchNorm, carrying its input."""


def _first_norm_input(model: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple | None:
    """(input, module) of the first BatchNorm with running statistics that `args` reach, or None."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.running_var is not None]
    if not norms:
        return None

    def stop(module, inputs):
        raise _FirstNorm(inputs[0], module)
    handles = [m.register_forward_pre_hook(stop) for m in norms]
    try:
        with torch.no_grad():
            model(*args)
    except _FirstNorm as reached:
        return reached.args
    except Exception:  # the model refuses these inputs: the caller falls back to the example's range
        return None
    finally:
        for handle in handles:
            handle.remove()
    return None


def image_range(model: torch.nn.Module | None, args: Sequence[torch.Tensor], index: int,
                example: np.ndarray | None = None) -> ImageRange:
    """The pixel range the model's first layers expect for image input `index` of `args`.

    A trained network's first BatchNorm records what its input looked like in training: each
    of `IMAGE_RANGES` is tried on natural-image-like pixels and the one whose statistics at that
    BatchNorm match its running mean and variance best is taken (by the squared log ratio of the
    variances plus the squared mean offset in running standard deviations, over channels).
    Without an informative BatchNorm (none, or untrained: mean 0 and variance 1 everywhere) the
    example's own values decide; without an example, ImageNet normalization, the common case."""
    reached = _first_norm_input(model, tuple(args)) if model is not None else None
    norm = reached[1] if reached else None
    if norm is not None and not (bool((norm.running_mean == 0).all()) and bool((norm.running_var == 1).all())):
        pixels = natural_images(args[index].shape, np.random.default_rng(0))
        scores = {}
        for candidate in IMAGE_RANGES:
            probe = list(args)
            probe[index] = torch.from_numpy(candidate.present(pixels)).to(args[index].dtype)
            values = _first_norm_input(model, tuple(probe))
            if values is None or values[1] is not norm:
                continue
            x = values[0].double().transpose(0, 1).reshape(norm.num_features, -1)
            variance, mean = norm.running_var.double(), norm.running_mean.double()
            scores[candidate] = float((torch.log(x.var(1) / variance) ** 2 + (x.mean(1) - mean) ** 2 / variance).mean())
        if scores:
            best = min(scores, key=scores.get)
            return dataclasses.replace(best, why="matches the first BatchNorm's running statistics best")
    if example is None or not example.size:
        return dataclasses.replace(IMAGE_RANGES[2], why="no example values and no trained BatchNorm to read; "
                                                       "the most common convention")
    low, high = float(example.min()), float(example.max())
    chosen = IMAGE_RANGES[0] if low >= 0 and high <= 1 else IMAGE_RANGES[1] if low >= -1 and high <= 1 else \
        IMAGE_RANGES[3] if low >= 0 and high <= 255 else IMAGE_RANGES[2]
    return dataclasses.replace(chosen, why=f"the example's values lie in [{low:.3g}, {high:.3g}]")


def draw_input(name: str, shape: Sequence[int], dtype: np.dtype, rng: np.random.Generator,
               like: np.ndarray | None = None, vocabulary: int | None = None,
               image: ImageRange | None = None) -> np.ndarray:
    """One seeded input: images (with `image` given, see `is_image`) natural-image-like pixels
    in that range; other floats normal with the mean and spread of `like` (standard normal
    without it); a mask (its name says so) ones over a seeded prefix of its last axis, as
    padding leaves them (at least one position kept, so that no row is wholly masked); a
    bool 0/1; token type ids (segments) 0 unless `like` shows others; other integers token ids
    in [0, vocabulary) — or within the range `like` shows."""
    check_input_size(name, shape, dtype)
    dtype = np.dtype(dtype)
    if image is not None and is_image(shape, dtype):
        return image.present(natural_images(shape, rng)).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        mean, std = (float(like.mean()), float(np.nan_to_num(like.astype(np.float64).std(), nan=1.0))) \
            if like is not None and like.size else (0.0, 1.0)
        return (rng.standard_normal(shape) * max(std, 1e-3) + mean).astype(dtype)
    if "mask" in name.lower() and len(shape) >= 1 and shape[-1] > 0:
        kept = rng.integers(1, shape[-1] + 1, (*shape[:-1], 1))
        return (np.arange(shape[-1]) < kept).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(dtype)
    if "token_type" in name.lower() and (like is None or not like.size):
        # one segment: every model has type 0, and how many more it has (BERT 2, RoBERTa 1) it does not say
        return np.zeros(shape, dtype)
    if like is not None and like.size:
        low, high = int(like.min()), int(like.max())
    else:
        low, high = 0, (vocabulary or DEFAULT_VOCABULARY) - 1
    return rng.integers(low, high + 1, shape).astype(dtype)


def random_feeds(specs: Sequence[TensorSpec], count: int, *, seed: int = 0, batch: int | None = None,
                 dims: dict[str, int] | None = None, vocabulary: int | None = None) -> list[dict[str, np.ndarray]]:
    """`count` seeded feeds for inputs described by `specs` (an artifact's): a symbolic
    dimension takes its value from `dims`, else 1; with `batch` given, the batch symbol (the
    first input's first dimension) takes that value on whichever axis an input carries it."""
    rng = np.random.default_rng(seed)
    batch_symbol = next((s.shape[0] for s in specs if s.shape and not isinstance(s.shape[0], int)), None)
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            shape = [batch if batch and d == batch_symbol else d if isinstance(d, int) and d > 0
                     else (dims or {}).get(d, 1) for d in spec.shape]
            feed[spec.name] = draw_input(spec.name, shape, np.dtype(spec.dtype), rng, vocabulary=vocabulary)
        feeds.append(feed)
    return feeds


Example = torch.Tensor | Sequence[torch.Tensor]


def as_args(example: Example) -> tuple[torch.Tensor, ...]:
    """Normalize an example (or a batch of inputs) to a tuple of tensors; numpy arrays, as a
    user holding data often passes them, become tensors."""
    args = (example,) if isinstance(example, (torch.Tensor, np.ndarray)) else tuple(example)
    args = tuple(torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise UserError("inputs must be a tensor (or numpy array) or a sequence of them, one per model input")
    return args


def _split_axis(array: np.ndarray, spec: TensorSpec) -> int | None:
    """The axis along which `array` holds several of what `spec`'s static shape takes one of:
    the one fixed dimension of size 1 (a batch of one exported static) that it exceeds (axis
    1 for an LSTM state [2, B, 128] against [2, 1, 128]); None where it fits as it is or
    differs elsewhere — a longer sentence than a fixed sequence axis takes is not several
    sentences, and `check_feeds` refuses it."""
    if array.ndim != len(spec.shape):
        return None
    differing = [axis for axis, (d, n) in enumerate(zip(spec.shape, array.shape))
                 if isinstance(d, int) and d > 0 and n != d]
    if len(differing) != 1 or spec.shape[differing[0]] != 1:
        return None
    return differing[0]


def feeds_from(names: Sequence[str], batches: Sequence[Example], specs: Sequence[TensorSpec] | None = None
               ) -> list[dict[str, np.ndarray]]:
    """Feed dicts keyed by input name. Given an artifact's input `specs`, a batch larger than
    a static batch of one is split along each input's own batch axis (`_split_axis`; not
    always axis 0) into one feed per sample, and an input with no such axis goes into every
    feed whole. Inputs must agree on that count."""
    feeds = []
    for batch in batches:
        arrays = [a.detach().cpu().numpy() for a in as_args(batch)]
        if len(arrays) != len(names):
            raise UserError(f"inputs have {len(arrays)} tensors, the model takes {len(names)} ({', '.join(names)})")
        axes = [_split_axis(a, s) for a, s in zip(arrays, specs)] if specs else [None] * len(arrays)
        splits = {a.shape[axis] for a, axis in zip(arrays, axes) if axis is not None}
        if len(splits) > 1:
            shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in zip(names, arrays))
            raise UserError(f"inputs {shapes} do not split into the artifact's inputs "
                            f"({', '.join(str(s.shape) for s in specs)}) the same number of times")
        count = splits.pop() if splits else 1
        for index in range(count):
            feeds.append({n: a if axis is None else a.take([index], axis=axis) for n, a, axis in zip(names, arrays, axes)})
    return feeds


def check_feeds(feeds: Sequence[dict[str, np.ndarray]], specs: Sequence[TensorSpec]) -> None:
    """Refuse feeds that do not fit the inputs `specs` declare (dtype, rank, static dims),
    naming the input, before a runtime fails on them in its own words."""
    for feed in feeds:
        for spec in specs:
            array = feed.get(spec.name)
            if array is None:
                continue
            shape, wanted = list(array.shape), "x".join(map(str, spec.shape)) or "a scalar"
            fits = len(shape) == len(spec.shape) and all(not isinstance(d, int) or d <= 0 or d == n
                                                         for d, n in zip(spec.shape, shape))
            if array.dtype.name != spec.dtype or not fits:
                raise UserError(f"input {spec.name!r} is {array.dtype.name} of shape "
                                f"{'x'.join(map(str, shape)) or 'a scalar'}; the artifact takes {spec.dtype} "
                                f"of shape {wanted}")


def check_token_ids(feeds: Sequence[dict[str, np.ndarray]], vocabulary: int | None) -> None:
    """Refuse token ids (integer inputs named for ids or tokens) outside [0, vocabulary), naming
    the input: the embedding lookup would fail on them deep in the runtime (torch's IndexError,
    ONNX Runtime's Gather error)."""
    if not vocabulary:
        return
    for feed in feeds:
        for name, array in feed.items():
            if np.issubdtype(array.dtype, np.integer) and array.size and any(
                    word in name.lower() for word in ("ids", "token")):
                low, high = int(array.min()), int(array.max())
                if low < 0 or high >= vocabulary:
                    raise UserError(f"input {name!r} holds token ids from {low} to {high}; the model's vocabulary "
                                    f"has {vocabulary} (ids 0 to {vocabulary - 1})")


@dataclass
class Source:
    """What a run starts from: the torch model, its example arguments, the batches it is
    verified on (and where they come from), and the policy that makes more inputs like them.

    `label` names the model in artifacts (a zoo name, or the module's class name).
    """

    model: torch.nn.Module
    example: tuple[torch.Tensor, ...]
    label: str
    verification: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    verification_label: str = ""
    example_label: str = "the example"  # what the example is, in verification's label

    @property
    def input_names(self) -> list[str]:
        return input_names(self.model, len(self.example))

    @property
    def vocabulary(self) -> int | None:
        return vocabulary_size(self.model)

    def image_ranges(self) -> dict[int, ImageRange]:
        """For each image input (by position), the pixel range the model expects (`image_range`)."""
        return {i: image_range(self.model, self.example, i, a.numpy()) for i, a in enumerate(self.example)
                if is_image(a.shape, a.dtype)}

    def seeded_batches(self, count: int, seed: int = 1, images: dict[int, ImageRange] | None = None
                       ) -> list[tuple[torch.Tensor, ...]]:
        """The example plus `count - 1` seeded draws shaped and ranged like it, image inputs as
        natural-image-like pixels in the range the model expects (`images`, found if not given)."""
        rng = np.random.default_rng(seed)
        images = self.image_ranges() if images is None else images
        names, vocabulary = self.input_names, self.vocabulary
        draws = [tuple(torch.from_numpy(draw_input(n, a.shape, a.numpy().dtype, rng, like=a.numpy(),
                                                   vocabulary=vocabulary, image=images.get(i)))
                       for i, (n, a) in enumerate(zip(names, self.example)))
                 for _ in range(count - 1)]
        return [self.example, *draws]

    def with_default_verification(self, count: int = 4) -> "Source":
        """Verification batches where none were given: the example plus seeded draws like it,
        labelled with what they are (for images: the pixel range and what chose it)."""
        if not self.verification:
            images = self.image_ranges()
            self.verification = self.seeded_batches(count, images=images)
            described = [f"{self.input_names[i]} as 1/f-spectrum images, {r.name} ({r.why})" for i, r in images.items()]
            self.verification_label = f"{self.example_label} + {count - 1} seeded random inputs" + \
                (f": {'; '.join(described)}" if described else "")
        return self


# --- backends: the unit of extension ---------------------------------------------------------

def option(default, help: str, *, flag: str | None = None, keyword: str | None = None,
           choices: Sequence | None = None, minimum: int | None = None, maximum: int | None = None):
    """A field of a backend's `Options` dataclass, with what the CLI and the SDK need to offer
    it: its help text, allowed values, and (when it is not `--<backend>-<field>` and
    `<backend>_<field>`) its flag and SDK keyword."""
    return field(default=default, metadata={"help": help, "flag": flag, "keyword": keyword, "choices": choices,
                                            "minimum": minimum, "maximum": maximum})


@dataclass
class ExportRequest:
    """What a backend exports: the module after every model transform (quantization, slimming,
    a spiking form), called on `args`, into `folder` (a staging folder) as `name`.

    `precision` labels a quantized module ("w8a8") or "fp32"; `dynamic_axes` maps input names
    to {axis: symbol}; `output_names` None means `output_<i>`.
    """

    module: torch.nn.Module
    args: tuple[torch.Tensor, ...]
    folder: Path
    name: str
    input_names: list[str]
    output_names: list[str] | None = None
    precision: str = "fp32"
    dynamic_axes: dict[str, dict[int, str]] | None = None


class Backend(ABC):
    """One target format: its options, its exporter, the runner for its artifacts, and how it
    expresses quantized and spiking models. Registered by name in `edgeport.export`.

    `Options` is a dataclass whose fields are made with `option(...)`; each becomes a keyword
    of `edgeport.export(...)` and a flag of `edgeport export`. `formats` are the artifact
    formats whose runners this backend provides.
    """

    name: str
    summary: str
    Options: type
    formats: tuple[str, ...] = ()
    quantized: str = "not supported"  # how a model from `edgeport.quantize` is expressed
    spiking: str = "unrolled and step forms, as plain graphs"

    @abstractmethod
    def export(self, request: ExportRequest, options) -> list[Artifact]:
        """Write the artifacts for `request` into `request.folder`; the last one is the
        target's main artifact. The SDK verifies each with `runner` before committing any."""

    suffixes: tuple[str, ...] = ()  # files of these suffixes open without a sidecar (`describe`)

    @abstractmethod
    def runner(self, artifact: Artifact, threads: int | None = None, profiling: bool = False) -> Runner:
        """An unloaded runner for one of this backend's artifacts; `profiling` asks for the
        runtime's fastest settings rather than the quietest (verification's)."""

    def describe(self, path: Path) -> Artifact:
        """An Artifact record for a file of this format that has no sidecar (written elsewhere)."""
        raise UserError(f"{path} has no {SIDECAR_SUFFIX} sidecar; was it exported by edgeport?")

    def options(self, values: dict) -> object:
        """The backend's Options from keyword values (unset ones keep their defaults), each
        checked against its declared choices and bounds."""
        import dataclasses

        chosen = {}
        for spec in dataclasses.fields(self.Options):
            keyword = option_keyword(self, spec)
            if values.get(keyword) is None:
                continue
            value, meta = values[keyword], spec.metadata
            named = f"{keyword} ({option_flag(self, spec)})"
            if meta.get("choices") and value not in meta["choices"]:
                raise UserError(f"{named} {value!r} is not one of {', '.join(map(str, meta['choices']))}")
            bounded = meta.get("minimum") is not None or meta.get("maximum") is not None
            if bounded and (not isinstance(value, int) or isinstance(value, bool)):
                raise UserError(f"{named} takes an integer, not {value!r}")
            if (meta.get("minimum") is not None and value < meta["minimum"]) or \
                    (meta.get("maximum") is not None and value > meta["maximum"]):
                raise UserError(f"{named} {value} is outside the supported range "
                                f"{meta['minimum']}..{meta['maximum']}")
            chosen[spec.name] = value
        return self.Options(**chosen)


def option_keyword(backend: Backend, spec) -> str:
    """The SDK keyword of one Options field: declared, else `<backend>_<field>`."""
    return spec.metadata.get("keyword") or f"{backend.name}_{spec.name}"


def option_flag(backend: Backend, spec) -> str:
    """The CLI flag of one Options field: declared, else `--<backend>-<field>`."""
    return spec.metadata.get("flag") or "--" + option_keyword(backend, spec).replace("_", "-")
