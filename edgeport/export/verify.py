"""Parity between any two runners on the same inputs (Polygraphy's Comparator, in small).

`compare(reference, candidate, batches)` runs both runners on every batch of feeds,
matches outputs by position, and judges each output with a tolerance chosen for its
dtype and the artifact's precision:

- float32: max abs error <= 1e-4 x the output's scale (max |reference|);
- float16: max abs error <= 1e-2 x scale;
- integer-quantized (int8 and narrower): cosine similarity and SQNR, not atol;
- bool and integer outputs (class ids), and outputs whose reference is all 0 and 1 (spikes):
  exactly equal.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeport.errors import UserError
from edgeport.runtime.runners import Runner


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
        return (f"{self.name}: {verdict} max abs {self.max_abs_error:.3g} (scale {self.scale:.3g}, "
                f"rel {self.max_rel_error:.3g}), cosine {self.cosine:.6f}, SQNR {self.sqnr_db:.1f} dB "
                f"[{self.tolerance.why}]")


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


def is_binary(array: np.ndarray) -> bool:
    """Whether every value is 0 or 1 (spike tensors), judged exactly rather than by error size."""
    return array.dtype == np.bool_ or (array.size > 0 and bool(np.isin(array, (0, 1)).all()))


def check_finite(feeds: dict[str, np.ndarray]) -> None:
    """Refuse inputs holding NaN or Inf: parity measured on them means nothing."""
    for name, array in feeds.items():
        if np.issubdtype(array.dtype, np.floating):
            nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
            if nan or inf:
                raise UserError(f"verification input {name!r} contains {nan} NaN and {inf} Inf values")


def judge(name: str, reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance) -> OutputParity:
    """Compute the error figures of one output and apply `tolerance` to them."""
    if reference.shape != candidate.shape:
        raise UserError(f"output {name!r}: shape {list(candidate.shape)} differs from reference "
                        f"{list(reference.shape)}")
    ref, cand = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
    finite = bool(np.isfinite(cand).all()) and bool(np.isfinite(ref).all())
    diff = np.abs(ref - cand) if finite else np.full_like(ref, np.inf)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    noise, signal = float((diff ** 2).sum()), float((ref ** 2).sum())
    if noise == 0:
        sqnr = math.inf
    else:
        sqnr = 10 * math.log10(signal / noise) if finite and signal > 0 else -math.inf
    norms = float(np.linalg.norm(ref) * np.linalg.norm(cand))
    cosine = float(ref @ cand / norms) if finite and norms > 0 else (1.0 if max_abs == 0 else 0.0)
    mismatched = int((diff > 0).sum())
    if tolerance.kind == "exact":
        passed = mismatched == 0
    elif tolerance.kind == "cosine":
        passed = finite and cosine >= tolerance.min_cosine and sqnr >= tolerance.min_sqnr_db
    else:
        passed = finite and max_rel <= tolerance.max_error
    return OutputParity(name, list(reference.shape), max_abs, max_rel, scale, cosine, sqnr, mismatched,
                        tolerance, passed)


def compare(reference: Runner, candidate: Runner, batches: list[dict[str, np.ndarray]],
            precision: str = "fp32", inputs_source: str = "given",
            tolerance: Tolerance | None = None) -> ParityReport:
    """Run both runners on every batch and judge each output; outputs are matched by position.

    `precision` picks the default tolerance per output dtype (see `tolerance_for`);
    `tolerance` overrides it for every float output.
    """
    if not batches:
        raise UserError("verification needs at least one input batch")
    ref_outputs: list[list[np.ndarray]] = []
    cand_outputs: list[list[np.ndarray]] = []
    samples = 0
    for feeds in batches:
        check_finite(feeds)
        ref, cand = reference.infer(feeds), candidate.infer(feeds)
        if len(ref) != len(cand):
            raise UserError(f"{candidate.name} gives {len(cand)} outputs, {reference.name} gives {len(ref)}")
        ref_outputs.append(list(ref.values()))
        cand_outputs.append(list(cand.values()))
        samples += next(iter(feeds.values())).shape[0] if feeds else 1
    report = ParityReport(reference.name, candidate.name, samples, inputs_source)
    for index, name in enumerate(candidate.output_names):
        ref = np.concatenate([r[index].reshape(1, -1) if r[index].ndim == 0 else r[index] for r in ref_outputs])
        cand = np.concatenate([c[index].reshape(1, -1) if c[index].ndim == 0 else c[index] for c in cand_outputs])
        chosen = tolerance if tolerance and np.issubdtype(ref.dtype, np.floating) else None
        if chosen is None and is_binary(ref):
            chosen = TOLERANCES["exact"]  # spikes: one flipped spike is a failure, not an error size
        report.outputs.append(judge(name, ref, cand, chosen or tolerance_for(precision, ref.dtype)))
    return report
