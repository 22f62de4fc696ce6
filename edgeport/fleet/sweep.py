"""`edgeport.sweep`: export once, measure on every device, one results folder.

The driver walks the plan with an executor (in this process, or Ray): it starts exports as
far as the executor has CPUs, commits each artifact into the results folder as it arrives,
shares it through the executor (Ray's object store on a cluster), estimates it here for
catalog devices that have no node, and starts its measurements as far as each device has
units. Every job's result is written the moment it finishes; `report.html` at the end.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from edgeport.errors import EdgeportError, UserError
from edgeport.fleet import jobs
from edgeport.fleet.plan import ESTIMATE, EXPORT, EXPORT_ROW, HOST, MEASURE, Job, Plan, check_model_inputs, \
    make_plan, parse_variant, resolve_models
from edgeport.fleet.results import DONE, FAILED, Results

if TYPE_CHECKING:
    from edgeport.sdk import Calibration

POLL_S = 0.5  # how long the driver waits for a job before it looks at the nodes again
QUEUED, RUNNING, SKIPPED = "queued", "running", "skipped"
MAX_MIN_DURATION_S = 3600.0  # an hour per profile: more is a typo (1e308 s never ends), not a setting
STATES = (QUEUED, RUNNING, DONE, FAILED, SKIPPED)


@dataclass
class ProgressEvent:
    """A job changed state; `counts` holds every row's jobs per state (rows: "export", then devices)."""

    job: Job
    state: str
    detail: str
    counts: dict[str, dict[str, int]]


@dataclass
class SweepResult:
    """What a sweep did: the jobs of its plan as the index has them, counts per row and state,
    and its times in seconds (`connect_s` to reach the executor, `run_s` from the first job to
    the report, `job_s` the sum of the times the jobs run now took where they ran, and
    `handling_s`, the sum over the jobs handed to the executor of the time from handing each
    over to recording its result, less its own time: scheduling, transfers, worker start-up
    and recording, the overhead per job even where jobs run side by side)."""

    out: Path
    report: Path
    counts: dict[str, dict[str, int]]
    jobs: list[dict]
    connect_s: float
    run_s: float
    job_s: float
    jobs_run: int
    handling_s: float
    cluster: str | None = None

    @property
    def failed(self) -> list[dict]:
        return [j for j in self.jobs if j["status"] == FAILED]

    def to_dict(self) -> dict:
        return {"out": str(self.out), "report": str(self.report), "cluster": self.cluster, "counts": self.counts,
                "connect_s": self.connect_s, "run_s": self.run_s, "job_s": self.job_s, "jobs_run": self.jobs_run,
                "handling_s": self.handling_s, "jobs": self.jobs}


def profile_settings(runs: int, warmup: int, sessions: int, min_duration_s: float, threads: int | None, ops: bool,
                     energy: bool) -> dict:
    """The `edgeport.profile` keywords every measurement of a sweep uses, checked here so that a
    bad value fails once, before any job, rather than once per job on every node (threads up
    to the limit `edgeport.profile` sets on this machine, at least 64)."""
    from edgeport.sdk import MAX_THREADS

    if runs <= 0 or warmup < 0 or sessions <= 0:
        raise UserError(f"runs and sessions must be positive and warmup non-negative (runs {runs}, sessions "
                        f"{sessions}, warmup {warmup})")
    if not (math.isfinite(min_duration_s) and 0 <= min_duration_s <= MAX_MIN_DURATION_S):
        raise UserError(f"the minimum duration of a profile is from 0 to {MAX_MIN_DURATION_S:g} s, "
                        f"not {min_duration_s}")
    if threads is not None and not 0 < threads <= MAX_THREADS:
        raise UserError(f"threads must be from 1 to {MAX_THREADS}, not {threads}")
    return {"runs": runs, "warmup": warmup, "sessions": sessions, "min_duration_s": min_duration_s,
            "threads": threads, "ops": ops, "energy": energy}


class _Run:
    """One pass over a plan: queues per row, jobs in flight, and the results folder."""

    def __init__(self, plan: Plan, executor, results: Results, settings: dict, example,
                 notify: Callable[[ProgressEvent], None]):
        self.plan, self.executor, self.results, self.settings, self.example = plan, executor, results, settings, example
        self.notify = notify
        self.counts = {row: dict.fromkeys(STATES, 0) for row in plan.rows()}
        self.state: dict[str, str] = {}
        self.queues: dict[str, deque] = {row: deque() for row in plan.rows()}
        self.running: dict[object, Job] = {}
        self.handed_over: dict[str, float] = {}  # job key -> when the executor got it (perf_counter s)
        self.calls: dict[str, tuple] = {}  # job key -> its function and arguments, to run it again
        self.handling_s = 0.0
        self.executed: list[tuple[Job, dict]] = []  # each job run now, with its record
        for job in plan.jobs:
            self._set(job, QUEUED)

    def _set(self, job: Job, state: str, detail: str = "") -> None:
        if job.key in self.state:
            self.counts[job.row][self.state[job.key]] -= 1
        self.state[job.key] = state
        self.counts[job.row][state] += 1
        self.notify(ProgressEvent(job, state, detail, self.counts))

    def execute(self) -> None:
        # the devices' agents start (the first time) while the exports run, not when the first measurement comes
        self.executor.prepare_devices({job.device for job in self.plan.jobs
                               if job.kind == MEASURE and self.results.finished(job) is None})
        for export in self.plan.exports():
            stored = self.results.stored_export(export)
            if stored is not None:
                self._set(export, SKIPPED)
                self._artifact_ready(export, *stored)
            else:
                self.queues[EXPORT_ROW].append((export, jobs.export_job, (
                    self.plan.model(export), self.plan.variant(export), export.target, self.example)))
        try:
            while self.running or any(self.queues.values()):
                self._start_what_fits()
                for finished in self.executor.wait(list(self.running), POLL_S) if self.running else ():
                    self._conclude(self.running.pop(finished.handle), finished)
                self._fail_lost_rows()
        except BaseException:  # Ctrl-C, SIGTERM: what finished is on disk; stop what runs
            self.executor.cancel(list(self.running))
            raise

    def _start_what_fits(self) -> None:
        for row in [*self.plan.devices, EXPORT_ROW]:  # measurements first: their artifacts are waiting
            queue = self.queues[row]
            while queue and self.counts[row][RUNNING] < self.executor.capacity(row):
                job, function, args = queue.popleft()
                self.calls[job.key] = (function, args)
                self._set(job, RUNNING)
                self.handed_over[job.key] = time.perf_counter()
                self.running[self.executor.start(job, function, *args)] = job

    def _conclude(self, job: Job, finished: jobs.Finished) -> None:
        if finished.retry:  # its node died: first in its row's queue, for another node of the device
            self._set(job, QUEUED, finished.reason)
            self.queues[job.row].appendleft((job, *self.calls[job.key]))
            return
        if finished.result is None:
            self._fail(job, finished.reason)
            return
        result = finished.result
        if job.kind != EXPORT:
            self._done(job, result)
            return
        bundle, artifact = result.pop("bundle"), result["artifact"]
        try:
            path = self.results.store_artifact(job, bundle, artifact["sha256"])
        except EdgeportError as error:  # damaged on the way here, or a name in the folder that is not ours
            self._fail(job, jobs.failure_reason(error))
            return
        self._done(job, result)
        self._artifact_ready(job, bundle, artifact["sha256"], path)

    def _done(self, job: Job, result: dict) -> None:
        seconds, node = result.pop("seconds"), result.pop("node", None)
        record = self.results.record(job, DONE, seconds=seconds, node=node, **result)
        for measured, measured_record in mark_shared_nodes(job, record, self.executed):
            self.results.amend(measured, measured_record)
        self.executed.append((job, record))
        shared = record.get("shared_node_with", [])
        if job.key in self.handed_over:
            self.handling_s += time.perf_counter() - self.handed_over.pop(job.key) - seconds
        if "profile" in result:
            detail = f"p50 {result['profile']['latency']['p50']:.4g} ms, node {node['node_id'][:12]}" + \
                (f", while {len(shared)} export(s) ran there" if shared else "")
        elif "estimate" in result:
            detail = f"estimated {result['estimate']['latency_ms']:.4g} ms"
        else:
            detail = f"{result['artifact']['exporter']}, parity {result['artifact']['parity']}"
        self._set(job, DONE, detail)

    def _fail(self, job: Job, reason: str) -> None:
        self.handed_over.pop(job.key, None)
        self.executed.append((job, self.results.record(job, FAILED, reason=reason)))
        self._set(job, FAILED, reason)
        if job.kind == EXPORT:
            for dependent in self.plan.device_jobs(job):
                if self.state[dependent.key] != QUEUED:
                    continue
                if self.results.finished(dependent) is not None:  # measured from an earlier export: kept
                    self._set(dependent, SKIPPED)
                else:
                    self._fail(dependent, f"its export failed: {reason}")

    def _artifact_ready(self, export: Job, bundle: jobs.ArtifactBundle, digests: dict[str, str], path: Path) -> None:
        shared = None
        for job in self.plan.device_jobs(export):
            if self.results.finished(job) is not None:
                self._set(job, SKIPPED)
            elif job.kind == ESTIMATE:  # a graph walk: no device needed, done where the results are
                self._set(job, RUNNING)
                self._conclude(job, jobs.run_here(jobs.estimate_job, path, job.device))
            else:
                shared = self.executor.share(bundle) if shared is None else shared
                self.queues[job.device].append((job, jobs.measure_job, (shared, digests, job.device, self.settings)))

    def _fail_lost_rows(self) -> None:
        rows = {job.row for job in self.running.values()} | {row for row, queue in self.queues.items() if queue}
        for row, reason in self.executor.lost(rows).items():
            handles = [handle for handle, job in self.running.items() if job.row == row]
            self.executor.cancel(handles)
            for handle in handles:
                self._fail(self.running.pop(handle), reason)
            while self.queues[row]:
                self._fail(self.queues[row].popleft()[0], reason)


def ran_beside(record: dict, other: dict) -> bool:
    """Whether two finished jobs' records say they ran on one node at once (by that node's clock)."""
    windows = record.get("wall_clock_s"), other.get("wall_clock_s")
    if record["status"] != DONE or other["status"] != DONE or None in windows:
        return False
    (start, end), (other_start, other_end) = windows
    return record["node"]["node_id"] == other["node"]["node_id"] and start < other_end and other_start < end


def mark_shared_nodes(job: Job, record: dict, executed: list[tuple[Job, dict]]) -> list[tuple[Job, dict]]:
    """Where every node of a cluster is a device, exports run on the devices' spare CPUs, and a
    measurement's latency then includes what an export beside it took from the node's CPUs and
    memory. Adds the export's key to `shared_node_with` of each measurement that `job` (just
    recorded) and a job among `executed` ran beside each other on one node; returns the
    measurements so marked, each with its record."""
    marked = []
    for other, other_record in executed:
        if {job.kind, other.kind} == {EXPORT, MEASURE} and ran_beside(record, other_record):
            measured, measured_record, export = (job, record, other) if job.kind == MEASURE else \
                (other, other_record, job)
            measured_record["shared_node_with"] = [*measured_record.get("shared_node_with", []), export.key]
            marked.append((measured, measured_record))
    return marked


def sweep(models: Sequence[str | torch.nn.Module], variants: Sequence[str] = ("fp32",),
          devices: Sequence[str] | None = None, out: str | Path = "fleet", *, targets: Sequence[str] = ("onnx",),
          cluster: str | None = None, example=None, weights: str | Path | None = None,
          calib: Calibration | None = None, runs: int = 200,
          warmup: int = 20, sessions: int = 5, min_duration_s: float = 0.0, threads: int | None = None,
          ops: bool = True, energy: bool = True,
          on_progress: Callable[[ProgressEvent], None] | None = None) -> SweepResult:
    """Export every model in every variant to every target once, measure each artifact on every
    device that has a node (estimate it, labelled so, on catalog devices that have none), and
    write one JSON per job into `out` as it finishes, with `index.jsonl` and `report.html`.

    `models` are zoo names, `.pt2` files, `package.module:factory` (with `weights`) or modules,
    each named twice swept once; models not from the zoo need `example` (a batch, or shapes from
    `edgeport.sdk.parse_input`), and for quantized variants `calib`, a batch of real samples
    (as `edgeport.quantize` takes it); zoo models keep their own. `variants`: "fp32", "slim",
    "snn-unrolled", "snn-step", or a quantization preset with bit widths, "repq-w8a8". With
    `cluster` None everything runs in this process and "host" is the one measured device (the
    default `devices`); with a Ray address ("HOST:PORT", "ray://HOST:PORT" or "auto": the
    cluster most recently started on this machine) the same plan runs on that cluster, each
    measurement on a node advertising its device (default: every device a node advertises). `runs`, `warmup`,
    `sessions`, `min_duration_s` (s), `threads`, `ops` and `energy` are `edgeport.profile`'s.
    A rerun into the same `out` skips the jobs already done (keyed by model sha256, variant,
    target and device, and a measurement also by these profile settings: other settings measure
    again). A measurement during which an export ran on the same node (a cluster with no node
    apart from the devices exports on their spare CPUs) lists those exports in its record's
    `shared_node_with`, and its cell says so. An `out/report.html` that an earlier sweep did not
    write is refused before any job.
    `on_progress` is called on every change of a job's state.
    """
    from edgeport.fleet.report import check_report_path
    from edgeport.sdk import parse_input

    settings = profile_settings(runs, warmup, sessions, min_duration_s, threads, ops, energy)
    report_path = check_report_path(Path(out) / "report.html")
    parsed_variants = [parse_variant(v) for v in dict.fromkeys(variants)]
    if isinstance(example, (list, tuple)) and example and all(isinstance(e, str) for e in example):
        example = tuple(parse_input(e) for e in example)
    sources = resolve_models(list(models), weights, calib)
    check_model_inputs(sources, parsed_variants, example is not None)
    start = time.perf_counter()
    if cluster is None:
        from edgeport.fleet.local import InProcessExecutor

        executor = InProcessExecutor()
    else:
        from edgeport.fleet.cluster import RayExecutor

        executor = RayExecutor(cluster)
    try:
        connected = time.perf_counter()
        chosen = list(devices) if devices else [HOST] if cluster is None else sorted(executor.measured_devices)
        if not chosen:
            raise UserError(f"no node of the cluster at {cluster} advertises a device: join one with "
                            "`edgeport fleet join --device NAME`, or name catalog devices to estimate")
        plan = make_plan(sources, parsed_variants, targets, chosen, executor.measured_devices, cluster is not None,
                         settings)
        results = Results(out)
        run = _Run(plan, executor, results, settings, example, on_progress or (lambda event: None))
        run.execute()
    finally:
        executor.close()
    from edgeport.fleet.report import write_report

    keys = {job.key for job in plan.jobs}
    records = [r for r in results.records() if r["key"] in keys]
    report = write_report(report_path, plan, records)
    return SweepResult(results.out, report, run.counts, [results.entries[j.key] for j in plan.jobs
                                                         if j.key in results.entries],
                       connected - start, time.perf_counter() - connected,
                       sum(r["seconds"] or 0.0 for _, r in run.executed), len(run.executed), run.handling_s, cluster)
