"""The Artifact: a file on disk plus its `*.edgeport.json` sidecar, written atomically.

Exporters write into a staging folder inside the output folder; only after the artifact
has been checked (and verified) does `Staging.commit` move it into place. A failed export
removes the staging folder, so nothing half-written is left that looks like a result.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeport.errors import UserError
from edgeport.export.verify import ParityReport

SIDECAR_SUFFIX = ".edgeport.json"


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

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + SIDECAR_SUFFIX)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["parity"] = self.parity.to_dict() if self.parity else None
        return data

    def write_sidecar(self) -> Path:
        from edgeport import __version__

        self.edgeport_version = __version__
        self.created = self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
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


class Staging:
    """A temporary folder inside `out` whose files move into `out` only on `commit()`.

    Use as a context manager: leaving the block without committing (an exception) deletes
    the folder and everything in it.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=".edgeport-staging-", dir=self.out))
        except OSError as error:
            raise UserError(f"cannot write to output folder {self.out}: {error.strerror}") from error

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self, artifact: Artifact) -> Artifact:
        """Move the artifact's files and sidecar into `out` (each by an atomic rename)."""
        sidecar = artifact.write_sidecar()
        names = list(dict.fromkeys([*artifact.files, artifact.path.name]))  # sidecar goes last
        for name in [*names, sidecar.name]:
            target = self.out / name
            if target.is_dir() and not (self.dir / name).is_symlink():
                shutil.rmtree(target)
            os.replace(self.dir / name, target)
        artifact.path = self.out / artifact.path.name
        return artifact
