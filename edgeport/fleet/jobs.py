"""The work of one job, runnable on any node: export a variant, measure an artifact, estimate one.

Nothing here knows about Ray: the in-process executor calls these functions directly and the
Ray executor runs exports as tasks and measurements on device agents, passing `node`, the id
of the node they run on. Artifacts travel between jobs as `ArtifactBundle`s, the files'
bytes, because the nodes of a real fleet share no filesystem; a bundle is checked against the
sha256 of each file, as the export recorded them, before anything reads it.
"""
from __future__ import annotations

import hashlib
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from edgeport.core import SIDECAR_SUFFIX, Artifact, check_artifact_name
from edgeport.errors import CheckFailed, EdgeportError, UserError
from edgeport.fleet.plan import ModelSource, Variant


@dataclass
class ArtifactBundle:
    """An artifact as bytes: `files` maps each file's path relative to the artifact's folder
    (a Core ML package is a folder: one entry per file inside it) to its content, sidecar included."""

    main: str  # the artifact's own file (or package) name
    files: dict[str, bytes]

    @property
    def sidecar(self) -> str:
        return self.main + SIDECAR_SUFFIX

    def digests(self) -> dict[str, str]:
        """sha256 of every file but the sidecar, which is a description and is rewritten on commit."""
        return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(self.files.items())
                if name != self.sidecar}

    @property
    def size_bytes(self) -> int:
        return sum(len(data) for data in self.files.values())


def bundle_of(artifact: Artifact) -> ArtifactBundle:
    """Read every file of `artifact` (the ones its sidecar lists, and the sidecar) into a bundle."""
    folder = artifact.path.parent
    files = {member.relative_to(folder).as_posix(): member.read_bytes()
             for member in [*artifact.member_files(), artifact.sidecar]}
    return ArtifactBundle(artifact.path.name, files)


def _checked_relative(name: str) -> PurePosixPath:
    """A bundle path that stays inside the folder it is written to: plain names only."""
    path = PurePosixPath(name)
    for part in path.parts:
        check_artifact_name(part)  # no separators, '..', absolute paths or hidden names
    return path


def materialize(bundle: ArtifactBundle, folder: Path, expected: dict[str, str]) -> Artifact:
    """Check the bundle against the sha256 of each file the export recorded (`expected`), write
    it into `folder`, and return the artifact there. A damaged or incomplete bundle is a
    CheckFailed naming the file; nothing is written before the check passes."""
    actual = bundle.digests()
    for name in sorted(set(expected) | set(actual)):
        if actual.get(name) != expected.get(name):
            found = f"sha256 {actual[name][:16]}..." if name in actual else "missing"
            wanted = f"sha256 {expected[name][:16]}..." if name in expected else "no such file"
            raise CheckFailed(f"artifact {bundle.main} arrived damaged: {name} is {found}, the export wrote {wanted}")
    for name, data in bundle.files.items():
        path = folder / _checked_relative(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return Artifact.load(folder / bundle.main)


def node_description(node: str, device: str = "") -> dict:
    """Where a job ran: the node id, host name, the device it advertises and, where this node
    is not that device, why (`not_the_device`), and the energy meters there (the profile beside
    it carries CPU/GPU model, threads and runtime versions)."""
    from edgeport.devices.catalog import identity_mismatch
    from edgeport.runtime.energy import detect_meter

    meter, reasons = detect_meter()
    return {"node_id": node, "hostname": platform.node(), "device": device,
            "not_the_device": identity_mismatch(device) if device else None,
            "energy_meter": meter.name if meter else None, "energy_meter_unavailable": [] if meter else reasons}


@dataclass
class Finished:
    """A job an executor has finished: its result (the job function's return value), or None
    and the reason it failed; `retry` when what died was where it ran, not the job, and it may
    run again elsewhere."""

    handle: object
    result: dict | None
    reason: str = ""
    retry: bool = False


def one_line(error: BaseException) -> str:
    """An exception's message on one line, at most 500 characters."""
    return " ".join(str(error).split())[:500]


def failure_reason(error: BaseException) -> str:
    """One line saying why a job failed: the message of an error edgeport raised on purpose,
    else the exception's type and message, marked as internal (a bug to report)."""
    if isinstance(error, EdgeportError):
        return one_line(error)
    return f"internal error: {type(error).__name__}: {one_line(error)}"


def run_here(function: Callable[..., dict], *args, **kwargs) -> Finished:
    """Run a job function in this process; its failure, even a bug, becomes the job's reason
    instead of ending the sweep (an interrupt still ends it)."""
    try:
        return Finished(None, function(*args, **kwargs))
    except Exception as error:
        return Finished(None, None, failure_reason(error))


def ran_from(started_at: float) -> list[float]:
    """[start, now] in seconds since the epoch by this node's clock: jobs that ran on one node
    compare by it (the driver's clock is another machine's)."""
    return [started_at, time.time()]


def export_job(model: ModelSource, variant: Variant, target: str, example, *, node: str) -> dict:
    """Make `variant` of `model`, export it to `target` and verify it, on this node. `example`
    is for a model not from the zoo (a zoo model brings its own, and its test images). Returns
    {"bundle": ArtifactBundle, "artifact": a summary of the sidecar, "node", "seconds"} (wall s)
    and "wall_clock_s", when it ran (see `ran_from`)."""
    import edgeport
    from edgeport import zoo
    from edgeport.sdk import zoo_batches

    start, started_at = time.perf_counter(), time.time()
    with tempfile.TemporaryDirectory(prefix="edgeport-export-") as folder:
        reference, weights = model.materialize(Path(folder))
        source, verify_inputs, verify_source = reference, None, "given inputs"
        if model.from_zoo:
            example = zoo.example(reference)
        if variant.method is not None:
            source = edgeport.quantize(reference, model.calibration, method=variant.method, w_bits=variant.w_bits,
                                       a_bits=variant.a_bits, weights=weights)
            weights = None
            if model.from_zoo:  # a quantized module no longer says which zoo model it is: bring its data along
                verify_inputs = zoo_batches(reference)
            else:  # real samples, as `edgeport quantize` verifies on, rather than random draws
                verify_inputs, verify_source = [model.calibration], "the calibration batch"
        artifact = edgeport.export(source, example, targets=[target], out=Path(folder) / "out", weights=weights,
                                   name=f"{model.label}-{variant.name}", verify_inputs=verify_inputs,
                                   verify_inputs_source=verify_source, **variant.export_options)[target]
        bundle = bundle_of(artifact)
    parity = "passed" if artifact.parity and artifact.parity.passed else "not checked: " + "; ".join(artifact.notes)
    return {"bundle": bundle, "node": node_description(node), "seconds": time.perf_counter() - start,
            "wall_clock_s": ran_from(started_at),
            "artifact": {"file": artifact.path.name, "format": artifact.format, "precision": artifact.precision,
                         "exporter": artifact.exporter, "sha256": bundle.digests(), "bytes": bundle.size_bytes,
                         "parity": parity, "notes": artifact.notes}}


def measure_job(bundle: ArtifactBundle, expected: dict[str, str], device: str, settings: dict, *, node: str) -> dict:
    """Check the arrived artifact against `expected` (sha256 per file), then profile it on this
    node with `settings` (keywords of `edgeport.profile`). Returns {"profile", "node", "seconds",
    "wall_clock_s"}."""
    import edgeport

    start, started_at = time.perf_counter(), time.time()
    with tempfile.TemporaryDirectory(prefix="edgeport-measure-") as folder:
        artifact = materialize(bundle, Path(folder), expected)
        profile = edgeport.profile(artifact, label=f"{artifact.path.stem} on {device}", **settings).to_dict()
    profile["artifact"] = bundle.main  # the temporary path means nothing elsewhere
    return {"profile": profile, "node": node_description(node, device), "seconds": time.perf_counter() - start,
            "wall_clock_s": ran_from(started_at)}


def estimate_job(artifact_path: Path, device: str) -> dict:
    """The roofline estimate of the artifact on catalog `device` (labelled estimated)."""
    import edgeport
    from edgeport.devices.estimate import ESTIMATED_FORMATS

    start = time.perf_counter()
    artifact = Artifact.load(artifact_path)
    if artifact.format not in ESTIMATED_FORMATS:
        raise UserError(f"no node is {device} and the estimator reads only {', '.join(ESTIMATED_FORMATS)} graphs, "
                        f"not {artifact.format}")
    estimate = {k: v for k, v in edgeport.estimate(artifact_path, device).to_dict().items() if k != "nodes"}
    estimate["artifact"] = artifact_path.name
    return {"estimate": estimate, "seconds": time.perf_counter() - start}
