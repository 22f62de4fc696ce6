"""The results folder of a sweep: one JSON per job, an append-only index, the artifacts.

    OUT/jobs/<model>@<hash>.<variant>.<target>.<device>.json   one per job, written as it finishes
    OUT/index.jsonl                                             one line per finished job, appended
    OUT/artifacts/<model>@<hash>/                               the verified artifacts and sidecars
    OUT/report.html                                             variants compared across devices

A job file is written to a temporary name and renamed, then its index line is appended and
flushed to disk, so an interruption at any point leaves whole files and an index whose every
line names a file that exists. The index is what a rerun reads to know what is finished: one
file however many jobs, appended and never rewritten, so recording the 40,000th job costs
what the first did. A job file whose line never got written (the process died between the
two) is found by listing `jobs/` and gets its line when the folder is next opened.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from edgeport.core import Staging
from edgeport.errors import UserError
from edgeport.fleet.jobs import ArtifactBundle, bundle_of, materialize
from edgeport.fleet.plan import ESTIMATE, EXPORT, MEASURE, Job
from edgeport.runtime.report import (FINITE, FLAG, OBJECT, TEXT, ListOf, MapOf, Nullable, read_json, shape_problem,
                                     write_atomically)

JOB_SCHEMA = "edgeport.fleet.job/1"
DONE, FAILED = "done", "failed"
INDEX_SHAPE = {"key": TEXT, "kind": TEXT, "status": TEXT, "file": TEXT, "device": TEXT, "node_id": Nullable(TEXT),
               "reason": TEXT}
JOB_SHAPE = {"schema": TEXT, "key": TEXT, "kind": TEXT, "status": TEXT, "model": TEXT, "variant": TEXT,
             "target": TEXT, "device": TEXT, "reason": TEXT, "seconds": Nullable(FINITE), "node": Nullable(OBJECT)}
# What the report and a rerun read from a finished job, by kind: a file that lacks it is refused.
DONE_SHAPES = {
    EXPORT: {"artifact": {"file": TEXT, "sha256": MapOf(TEXT), "exporter": TEXT, "precision": TEXT, "parity": TEXT,
                          "bytes": FINITE}, "node": {"node_id": TEXT}, "seconds": FINITE,
             "wall_clock_s": Nullable((FINITE, FINITE))},
    MEASURE: {"node": {"node_id": TEXT, "hostname": TEXT, "energy_meter": Nullable(TEXT)},
              "wall_clock_s": Nullable((FINITE, FINITE)), "shared_node_with": Nullable(ListOf(TEXT)),
              "profile": {"latency": {"p50": FINITE, "median_ci95": (FINITE, FINITE), "valid": FLAG,
                                      "problems": ListOf(TEXT), "samples_ms": ListOf(FINITE)},
                          "energy": {"available": FLAG, "provenance": TEXT, "net_mj_per_inference": Nullable(FINITE),
                                     "reasons": ListOf(TEXT)},
                          "environment": OBJECT}},
    ESTIMATE: {"estimate": {"latency_ms": FINITE, "energy_mj": FINITE, "net_energy_mj": Nullable(FINITE),
                            "energy_provenance": TEXT, "confidence": MapOf(TEXT)}},
}


class Results:
    """The results folder `out`, opened for a sweep: what is finished, and where to write more."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.jobs_dir, self.artifacts_dir, self.index_path = self.out / "jobs", self.out / "artifacts", \
            self.out / "index.jsonl"
        self.entries: dict[str, dict] = {}  # key -> its latest index entry
        self._read_index()  # first: a folder refused for its index is left as it was
        self._index_unindexed_files()
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            self.artifacts_dir.mkdir(exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot write to results folder {self.out}: {error.strerror or error}") from error

    def _read_index(self) -> None:
        """Load the index; a last line cut short by a crash is dropped from the file, any other
        malformed line is a UserError naming the line."""
        if not self.index_path.is_file():
            return
        data = self.index_path.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            os.truncate(self.index_path, len(complete))
        for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as error:
                raise UserError(f"{self.index_path} line {number} is not JSON ({error}); move the folder away or "
                                "remove that line") from None
            problem = shape_problem(entry, INDEX_SHAPE, f"line {number}")
            if problem:
                raise UserError(f"malformed index {self.index_path}: {problem}")
            self.entries[entry["key"]] = entry

    def _index_unindexed_files(self) -> None:
        indexed = {entry["file"] for entry in self.entries.values()}
        for path in sorted(self.jobs_dir.glob("*.json")):
            if f"jobs/{path.name}" not in indexed:
                data = self._checked_job(path)
                self._append(self._entry(data, path.name))

    def _checked_job(self, path: Path) -> dict:
        data = read_json(path)
        problem = shape_problem(data, JOB_SHAPE)
        if not problem and data["schema"] != JOB_SCHEMA:
            problem = f"schema should be {JOB_SCHEMA!r}"
        if not problem and data["kind"] not in DONE_SHAPES:
            problem = f"kind should be one of {', '.join(DONE_SHAPES)}"
        if not problem and data["status"] == DONE:
            problem = shape_problem(data, DONE_SHAPES[data["kind"]])
        if problem:
            raise UserError(f"malformed job file {path}: {problem}")
        return data

    @staticmethod
    def _entry(data: dict, file_name: str) -> dict:
        return {"key": data["key"], "kind": data["kind"], "status": data["status"], "file": f"jobs/{file_name}",
                "device": data["device"], "node_id": (data.get("node") or {}).get("node_id"),
                "seconds": data.get("seconds"), "reason": data["reason"]}

    def _append(self, entry: dict) -> None:
        try:
            with open(self.index_path, "a", encoding="utf-8") as index:
                index.write(json.dumps(entry) + "\n")
                index.flush()
                os.fsync(index.fileno())
        except OSError as error:
            raise UserError(f"cannot append to {self.index_path}: {error.strerror or error}") from error
        self.entries[entry["key"]] = entry

    def record(self, job: Job, status: str, *, reason: str = "", seconds: float | None = None,
               node: dict | None = None, **payload) -> dict:
        """Write the job's result file, then its index line; returns the file's content."""
        data = {"schema": JOB_SCHEMA, "key": job.key, "kind": job.kind, "status": status, "model": job.model,
                "model_sha256": job.model_sha256, "variant": job.variant, "target": job.target, "device": job.device,
                "reason": reason, "seconds": seconds, "node": node,
                "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **payload}
        write_atomically(self.jobs_dir / job.file_name, json.dumps(data, indent=2, default=str) + "\n")
        self._append(self._entry(data, job.file_name))
        return data

    def amend(self, job: Job, data: dict) -> None:
        """Rewrite the result file of `job`, recorded before, with `data` (what `record` returned,
        added to); its index line still holds, as nothing it says has changed."""
        write_atomically(self.jobs_dir / job.file_name, json.dumps(data, indent=2, default=str) + "\n")

    def finished(self, job: Job) -> dict | None:
        """The index entry of `job` if it is done and its file is there. A measurement's key holds
        its profile settings: neither an estimate (a node of that device has joined since) nor a
        measurement made with other settings finishes it."""
        entry = self.entries.get(job.key)
        if entry is None or entry["status"] != DONE or not (self.out / entry["file"]).is_file():
            return None
        return entry

    def artifact_folder(self, job: Job) -> Path:
        return self.artifacts_dir / f"{job.model}@{job.model_sha256[:12]}"

    def store_artifact(self, job: Job, bundle: ArtifactBundle, digests: dict[str, str]) -> Path:
        """Commit the exported artifact into `artifacts/` (checked against `digests`, staged and
        moved into place whole); returns its path."""
        with Staging(self.artifact_folder(job)) as staging:
            artifact = materialize(bundle, staging.dir, digests)
            return staging.commit(artifact)[0].path

    def stored_export(self, job: Job) -> tuple[ArtifactBundle, dict[str, str], Path] | None:
        """A finished export's (bundle, sha256 per file, path) from the folder, or None if it is
        not finished or its files are missing or no longer match the sha256 it recorded."""
        from edgeport.core import Artifact

        entry = self.finished(job)
        if entry is None:
            return None
        record = self._checked_job(self.out / entry["file"])
        try:
            path = self.artifact_folder(job) / record["artifact"]["file"]
            digests = record["artifact"]["sha256"]
            bundle = bundle_of(Artifact.load(path))
        except (KeyError, TypeError, OSError, UserError):
            return None
        return (bundle, digests, path) if bundle.digests() == digests else None

    def records(self) -> list[dict]:
        """The result file of every job in the index (the latest of each key), checked."""
        return [self._checked_job(self.out / entry["file"]) for entry in self.entries.values()
                if (self.out / entry["file"]).is_file()]

