"""The plan of a sweep: models x variants x targets x devices, as jobs with stable keys.

An artifact does not depend on the device it will run on, so each (model, variant, target)
is exported once, by an export job that may run anywhere. Each device then gets one job per
artifact: a measurement on a node that is that device, or, where no node is, a roofline
estimate from the device catalog, labelled as an estimate. A job's key is the model's
sha256, the variant, the target and the device, and for a measurement the id of its profile
settings; a rerun skips the keys already done, so new settings measure again.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from edgeport.errors import UserError

if TYPE_CHECKING:
    from edgeport.sdk import Calibration

EXPORT, MEASURE, ESTIMATE = "export", "measure", "estimate"
EXPORT_ROW = "export"  # the progress row of export jobs; every other row is a device

# Device names become Ray resource names and parts of file names: keep them plain.
DEVICE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
HOST = "host"  # this machine: the one device an in-process sweep measures

PLAIN_VARIANTS: dict[str, dict] = {"fp32": {}, "slim": {"slim": True}, "snn-unrolled": {"snn_form": "unrolled"},
                                   "snn-step": {"snn_form": "step"}}
QUANTIZED_VARIANT = re.compile(r"(?P<method>[a-z]+)-w(?P<w_bits>\d+)a(?P<a_bits>\d+)")
VARIANT_FORMS = ("fp32, slim, snn-unrolled, snn-step, or METHOD-wBITSaBITS with METHOD a quantization preset "
                 "(e.g. repq-w8a8, minmax-w4a4)")


@dataclass(frozen=True)
class Variant:
    """How a model is changed before export: quantized (`method`, `w_bits`, `a_bits`), slimmed
    or in a spiking form (`export_options`, keywords of `edgeport.export`), or left as is."""

    name: str
    method: str | None = None
    w_bits: int = 0
    a_bits: int = 0
    export_options: dict = field(default_factory=dict, hash=False)


def parse_variant(name: str) -> Variant:
    """The variant called `name` (see `VARIANT_FORMS`); a quantized one is checked against the
    presets and bit widths `edgeport.quantize` accepts, so a typo fails before any job runs."""
    text = name.strip()
    if text in PLAIN_VARIANTS:
        return Variant(text, export_options=PLAIN_VARIANTS[text])
    match = QUANTIZED_VARIANT.fullmatch(text)
    if match is None:
        raise UserError(f"unknown variant {name!r}; use {VARIANT_FORMS}")
    from edgeport.quant.config import preset

    w_bits, a_bits = int(match["w_bits"]), int(match["a_bits"])
    preset(match["method"], w_bits=w_bits, a_bits=a_bits)  # raises naming the presets or the allowed widths
    return Variant(text, match["method"], w_bits, a_bits)


@dataclass
class ModelSource:
    """A model as a sweep ships it to whichever node exports it.

    `reference` is what `edgeport.load_model` takes (a zoo name, `package.module:factory`, a
    module object) or, for a model file, the file's name in `files`: the fleet shares no
    filesystem, so model and weights files travel as bytes. `sha256` is the loaded model's
    `source_sha256`; `label` names its rows and files. `calibration` is the batch its quantized
    variants are calibrated on, as the model's positional arguments (None for a zoo model,
    which brings its own).
    """

    label: str
    reference: str | torch.nn.Module
    sha256: str
    files: dict[str, bytes] = field(default_factory=dict)
    weights: str | None = None  # the name of the weights file in `files`
    calibration: torch.Tensor | tuple[torch.Tensor, ...] | None = None

    @property
    def from_zoo(self) -> bool:
        """Whether it is a zoo model, which brings its own example, calibration and test inputs."""
        from edgeport import zoo

        return isinstance(self.reference, str) and self.reference not in self.files and self.reference in zoo.names()

    def materialize(self, folder: Path) -> tuple[str | torch.nn.Module, str | None]:
        """Write the travelling files into `folder`; returns (reference, weights) for `load_model` there."""
        for name, data in self.files.items():
            (folder / name).write_bytes(data)
        reference = str(folder / self.reference) if self.reference in self.files else self.reference
        return reference, str(folder / self.weights) if self.weights else None


def _shipped_file(reference: str) -> Path | None:
    """The model file a reference names (`model.pt2`, `model.jit`), or None for a zoo name or factory."""
    path = Path(reference)
    return path if path.is_file() else None


def _label(reference: str | torch.nn.Module, model: torch.nn.Module) -> str:
    """What the rows and files of a model given as a factory or a module are called: the
    factory's name (`mods:tiny` is `tiny`: two factories of one class stay apart), else the
    module's class."""
    factory = re.fullmatch(r"[\w.]+:(\w+)", reference) if isinstance(reference, str) else None
    return factory[1] if factory else type(model).__name__.lower()


def resolve_models(models: Sequence[str | torch.nn.Module], weights: str | Path | None = None,
                   calib: Calibration | None = None) -> list[ModelSource]:
    """Load each model here once, to check it and hash it, and package it for the nodes with
    `calib` (see `edgeport.sdk.calibration_batch`) matched to its inputs. A model named twice is
    swept once; two names for one model (the same sha256) are refused, as their jobs would be one."""
    from edgeport import zoo
    from edgeport.core import check_artifact_name, source_sha256
    from edgeport.load import load_model
    from edgeport.sdk import calibration_batch

    if not models:
        raise UserError("a sweep needs at least one model")
    by_sha256: dict[str, ModelSource] = {}
    given_as: dict[str, str] = {}  # sha256 -> how the model was named
    for reference in dict.fromkeys(models):
        model = load_model(reference, weights)
        sha256, name = source_sha256(model), reference if isinstance(reference, str) else type(model).__name__
        if sha256 in by_sha256:
            raise UserError(f"{given_as[sha256]} and {name} are the same model (sha256 {sha256[:12]}...): name it once")
        files, shipped = {}, _shipped_file(reference) if isinstance(reference, str) else None
        if isinstance(reference, str) and reference in zoo.names():
            label = reference
        elif shipped is not None:
            label, reference = shipped.stem, shipped.name
            files[shipped.name] = shipped.read_bytes()
        else:
            label = _label(reference, model)
        weights_name = None
        if weights is not None:
            weights_name = "weights" + Path(weights).suffix
            files[weights_name] = Path(weights).read_bytes()
        source = ModelSource(re.sub(r"[^\w.-]", "_", label), reference, sha256, files, weights_name)
        if calib is not None and not source.from_zoo:
            source.calibration = calibration_batch(model, calib)
        by_sha256[sha256], given_as[sha256] = source, name
    sources = list(by_sha256.values())
    labels = [s.label for s in sources]
    for source in sources:  # two models of one name (`a/model.pt2`, `b/model.pt2`): their hash tells them apart
        if labels.count(source.label) > 1:
            source.label = f"{source.label}-{source.sha256[:8]}"
        check_artifact_name(source.label)
    return sources


def check_model_inputs(models: list[ModelSource], variants: list[Variant], has_example: bool) -> None:
    """Refuse, before any job, a model the exports could not run: one not from the zoo needs an
    example input, and calibration data for each quantized variant (a zoo model brings both)."""
    quantized = [v.name for v in variants if v.method is not None]
    for model in models:
        if model.from_zoo:
            continue
        if not has_example:
            raise UserError(f"{model.label} needs an example input (--input 1x3x224x224, or example= in "
                            "edgeport.sweep); only zoo models bring their own")
        if quantized and model.calibration is None:
            raise UserError(f"{', '.join(quantized)} of {model.label} needs calibration data, about 32 real samples "
                            "(--calib data.npz, or calib= in edgeport.sweep); only zoo models bring their own")


@dataclass(frozen=True)
class Job:
    """One unit of work: an export of (model, variant, target), or the measurement or estimate
    of that artifact on `device`."""

    kind: str  # EXPORT, MEASURE or ESTIMATE
    model: str  # the model's label
    model_sha256: str
    variant: str
    target: str
    device: str = ""  # empty for an export
    settings_id: str = ""  # a measurement's profile settings (`profile_settings_id`); empty for the others

    @property
    def key(self) -> str:
        """What a rerun recognizes a finished job by: model hash, variant, target, device, and
        a measurement's settings (one made with other runs or threads is not this one)."""
        return "/".join(filter(None, (self.model_sha256, self.variant, self.target, self.device or EXPORT,
                                      self.settings_id)))

    @property
    def export_key(self) -> str:
        """The key of the export whose artifact this job runs."""
        return "/".join((self.model_sha256, self.variant, self.target, EXPORT))

    @property
    def row(self) -> str:
        """The progress row this job counts in: its device, or the exports."""
        return self.device or EXPORT_ROW

    @property
    def file_name(self) -> str:
        """Its result file's name: readable, and unique per key."""
        settings = f".{self.settings_id}" if self.settings_id else ""
        return (f"{self.model}@{self.model_sha256[:12]}.{self.variant}.{self.target}.{self.device or EXPORT}"
                f"{settings}.json")

    def describe(self) -> str:
        """For progress lines: `measure vit-digits repq-w8a8 onnx on jetson-orin-nano`."""
        return f"{self.kind} {self.model} {self.variant} {self.target}" + (f" on {self.device}" if self.device else "")


@dataclass
class Plan:
    """Every job of a sweep (exports first) and what the device jobs need from their export."""

    models: list[ModelSource]
    variants: list[Variant]
    targets: list[str]
    devices: list[str]
    jobs: list[Job]

    def exports(self) -> list[Job]:
        return [j for j in self.jobs if j.kind == EXPORT]

    def device_jobs(self, export: Job) -> list[Job]:
        return [j for j in self.jobs if j.kind != EXPORT and j.export_key == export.key]

    def model(self, job: Job) -> ModelSource:
        return next(m for m in self.models if m.sha256 == job.model_sha256 and m.label == job.model)

    def variant(self, job: Job) -> Variant:
        return next(v for v in self.variants if v.name == job.variant)

    def rows(self) -> list[str]:
        return [EXPORT_ROW, *self.devices]


def check_device_name(name: str) -> str:
    """A device name is lower-case letters, digits, `.`, `_` and `-` (it becomes a Ray resource
    and part of file names)."""
    if not DEVICE_NAME.fullmatch(name):
        raise UserError(f"device name {name!r} is not plain: use lower-case letters, digits, '.', '_' and '-' "
                        "(at most 64), like jetson-orin-nano")
    return name


def device_kind(device: str, measured: set[str], on_cluster: bool) -> str:
    """MEASURE where a node is the device, else ESTIMATE for a catalog device; anything else
    is a UserError saying why neither is possible."""
    from edgeport.devices import catalog

    check_device_name(device)
    if device in measured:
        return MEASURE
    if device == HOST:
        raise UserError("'host' is the machine an in-process sweep runs on; on a cluster, name the devices its "
                        "nodes advertise (see `edgeport fleet status`)")
    try:
        catalog.get(device)
    except UserError as unknown:
        where = "no node of the cluster advertises it" if on_cluster else "it can only be measured on a cluster"
        raise UserError(f"{unknown}; {where}") from None
    return ESTIMATE


def profile_settings_id(settings: dict) -> str:
    """A short id of a measurement's profile settings (keywords of `edgeport.profile`)."""
    return "p" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def make_plan(models: list[ModelSource], variants: list[Variant], targets: Sequence[str], devices: Sequence[str],
              measured: set[str], on_cluster: bool, settings: dict) -> Plan:
    """The jobs of models x variants x targets x devices: one export per (model, variant,
    target), then one job per device of each, measured with the profile `settings` where
    `measured` holds the device."""
    from edgeport.export import registry

    targets = list(dict.fromkeys(t.strip() for t in targets if t.strip()))
    devices = list(dict.fromkeys(d.strip() for d in devices if d.strip()))
    if not variants or not targets or not devices:
        raise UserError("a sweep needs at least one variant, one target and one device")
    for target in targets:
        registry.get(target)  # an unknown target names the registered ones
    kinds = {device: device_kind(device, measured, on_cluster) for device in devices}
    jobs = []
    for model in models:
        for variant in variants:
            for target in targets:
                jobs.append(Job(EXPORT, model.label, model.sha256, variant.name, target))
    measurement = profile_settings_id(settings)
    jobs += [Job(kinds[device], e.model, e.model_sha256, e.variant, e.target, device,
                 measurement if kinds[device] == MEASURE else "") for e in list(jobs) for device in devices]
    return Plan(models, variants, targets, devices, jobs)
