"""Fleet benchmark: scheduling overhead per job, cold and warm, and jobs/min with one worker node against two.

Two local Ray clusters run side by side on this machine (`edgeport.fleet.localcluster`): one
with one worker node, one with two, every worker advertising the same device, "bench-node"
(one CPU, one measurement at a time each); the head of each is no device (one CPU: the
cluster's exports run there). Rounds alternate between the clusters, so both see the same
phases of this shared machine. The plan is `edgeport.sweep` of 3 zoo models x 3 variants on
"bench-node": 9 exports and 9 measurements (200 runs in 2 sessions, 1 runtime thread, no op
profile). Each device node measures in its agent, a process that outlives sweeps; an
unrecorded sweep after a cluster starts brings them up. The sweeps of a round:

- "cold": with the agents stopped first (as right after the nodes joined, or after edgeport
  changed), a new driver's sweep of the whole plan into an empty folder, as an `edgeport
  sweep` command runs it: Ray starts a new worker on the head and a new agent on the device
  node, each importing torch and edgeport (seconds); the agent starts while the head exports.
  One-worker cluster only (its exports are the costly part of a round).
- "resume": a new driver's sweep of the 9 measurements only, into a copy of a seed folder
  exported once before the rounds, as a rerun with nothing left to export, agents running.
- "cold-resume": the same with the agents stopped first: the first measurement waits for the
  agent to start, with nothing to run meanwhile. One-worker cluster only.
- "warm": the second sweep of a driver (after "cold" on the one-worker cluster, after
  "resume" on the two-worker one): the 9 measurements only.

Measured:
- Scheduling overhead per job, two ways. (1) The issue's: (sweep run time - the sum of the
  job times) / jobs, where jobs run one after another: the warm, resume and cold-resume
  sweeps on the one-worker cluster. The run time is the sweep's wall clock from the plan to the written
  report (sharing the artifacts, Ray's scheduling and transfers, workers starting, writing
  each job's file and index line, the report); the time to connect to the cluster is
  reported beside it. A job's time is measured inside the job, on its worker (an export:
  making, exporting and verifying the variant; a measurement: unpacking and checking the
  artifact, then profiling it). In the cold sweep exports (on the head) and measurements (on
  the worker) run side by side, so run time minus the sum of job times says nothing there;
  (2) the sweep's `handling_s` does: for each job, the time from the driver handing it to
  Ray to the driver having recorded its result, less the job's own time, summed, per job.
  (2) is reported for every sweep; where jobs run one after another it equals (1) but for
  the driver's own loop between jobs. Target: under 0.5 s per job, cold and warm.
- Jobs per minute = jobs / run time, one worker against two, warm and resume.
- Where a cold worker's time goes, in fresh processes of this Python (3 repeats, medians):
  importing Ray, then what a fleet job's or agent's code unpickles (`edgeport.fleet.cluster`, which
  imports edgeport and torch), then the rest of `prepare_worker`, and a full `gc.collect()`
  (what `edgeport.profile` runs before timing) before and after the worker froze its objects.
- Sizes that decide how the results folder, the index and the report grow, and how many
  results per second the driver records (job file and index line, as a sweep writes them),
  for the README's arithmetic at 1,000 devices.

Writes bench/results/fleet.json. Run: `.venv/bin/python bench/fleet_bench.py`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import edgeport as ep
from edgeport.devices.catalog import cpu_model
from edgeport.fleet.cluster import connect, require_ray, stop_agents
from edgeport.fleet.localcluster import LocalCluster
from edgeport.fleet.plan import MEASURE, Job
from edgeport.fleet.results import DONE, Results

RESULTS = Path(__file__).resolve().parent / "results" / "fleet.json"
MODELS = ["cnn-digits", "cnn-digits-pruned", "vit-digits"]
VARIANTS = ["fp32", "repq-w8a8", "repq-w4a4"]
DEVICE = "bench-node"
ROUNDS = 3  # per cluster, alternating
PROFILE = {"runs": 200, "warmup": 20, "sessions": 2, "threads": 1, "ops": False}
OVERHEAD_TARGET_S = 0.5


def start_cluster(workers: int) -> LocalCluster:
    """A head and `workers` nodes advertising DEVICE, all registered (this process disconnected again)."""
    cluster = LocalCluster(num_cpus=1, object_store_bytes=100 * 2 ** 20)
    try:
        cluster.start_head()
        for index in range(workers):
            cluster.join(f"w{workers}{index}", DEVICE)
        connect(cluster.address)
        cluster.wait_for({DEVICE}, nodes_each=workers)
    except BaseException:
        cluster.stop()
        raise
    finally:
        require_ray().shutdown()
    return cluster


def driver_records_per_s(job_file: Path, count: int = 500) -> float:
    """Measured results per second this process records as the driver does (job file written
    and renamed, index line appended and synced), with a real measurement's content."""
    data = json.loads(job_file.read_text())
    with tempfile.TemporaryDirectory(prefix="fleet-records-") as folder:
        results = Results(folder)
        start = time.perf_counter()
        for index in range(count):
            job = Job(MEASURE, data["model"], data["model_sha256"], data["variant"], data["target"], f"d{index}")
            results.record(job, DONE, seconds=data["seconds"], node=data["node"], profile=data["profile"])
        return count / (time.perf_counter() - start)


def folder_sizes(out: Path) -> dict:
    """Bytes per measured job file, per index line, per artifact, and of the report's device
    cells (latency and energy: what a device column adds per model and variant)."""
    jobs = [json.loads(p.read_text()) | {"bytes": p.stat().st_size} for p in (out / "jobs").glob("*.json")]
    measured = [j["bytes"] for j in jobs if j["kind"] == "measure"]
    exports = [j["artifact"]["bytes"] for j in jobs if j["kind"] == "export"]
    lines = (out / "index.jsonl").read_bytes().splitlines()
    page = (out / "report.html").read_text()
    cells = re.findall(r"<td class='num[^']*'>.*?</td>|<td>not measured: .*?</td>", page)  # latency and energy
    return {"measure_job_file_bytes_mean": statistics.mean(measured),
            "index_line_bytes_mean": statistics.mean(len(line) + 1 for line in lines),
            "artifact_bytes": {"min": min(exports), "max": max(exports), "mean": statistics.mean(exports)},
            "report_bytes": len(page.encode()), "report_device_cells": len(cells),
            "report_device_cell_bytes_mean": statistics.mean(len(c.encode()) for c in cells)}


START_UP_PROBE = """
import gc, json, time
times, start = {}, time.perf_counter()
import ray
times["import_ray_s"] = time.perf_counter() - start; start = time.perf_counter()
import edgeport.fleet.cluster as cluster
times["import_edgeport_s"] = time.perf_counter() - start; start = time.perf_counter()
gc.collect()
times["gc_collect_before_freeze_s"] = time.perf_counter() - start; start = time.perf_counter()
cluster.prepare_worker()
times["prepare_worker_s"] = time.perf_counter() - start; start = time.perf_counter()
gc.collect()
times["gc_collect_after_freeze_s"] = time.perf_counter() - start
times["frozen_objects"] = gc.get_freeze_count()
print(json.dumps(times))
"""


def worker_start_up(repeats: int = 3) -> dict:
    """What a new worker pays before and around its first job, medians over fresh processes (s)."""
    probes = [json.loads(subprocess.run([sys.executable, "-c", START_UP_PROBE], capture_output=True, text=True,
                                        check=True).stdout) for _ in range(repeats)]
    return {key: statistics.median(p[key] for p in probes) for key in probes[0]} | {"repeats": repeats}


def timed_sweep(cluster: LocalCluster, out: Path, seed: Path | None) -> dict:
    """One sweep of the plan into `out` (a copy of `seed`, whose exports are done, if given):
    its times, the nodes that measured and the load average after it."""
    if seed is not None:
        shutil.copytree(seed, out)
    jobs = len(MODELS) * len(VARIANTS) * (1 if seed is not None else 2)
    result = ep.sweep(MODELS, VARIANTS, [DEVICE], out, cluster=cluster.address, **PROFILE)
    assert not result.failed and result.jobs_run == jobs, (result.failed, result.jobs_run)
    nodes = {json.loads((out / j["file"]).read_text())["node"]["node_id"] for j in result.jobs
             if j["kind"] == "measure"}
    return {"jobs": result.jobs_run, "run_s": result.run_s, "job_s": result.job_s, "handling_s": result.handling_s,
            "nodes_used": len(nodes), "jobs_per_min": 60 * result.jobs_run / result.run_s,
            "overhead_per_job_s": (result.run_s - result.job_s) / result.jobs_run,
            "handling_per_job_s": result.handling_s / result.jobs_run, "load_average_after": os.getloadavg()}


def main() -> None:
    load_before = os.getloadavg()
    start_up = worker_start_up()
    print(json.dumps(start_up), flush=True)
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as work:
        seed = Path(work) / "seed"
        print("exporting the artifacts once (in this process)", flush=True)
        ep.sweep(MODELS, VARIANTS, ["raspberry-pi-5"], seed, runs=1)
        clusters = {}
        try:
            for workers in (1, 2):
                print(f"starting a cluster with {workers} worker node(s)", flush=True)
                clusters[workers] = start_cluster(workers)
                timed_sweep(clusters[workers], Path(work) / f"agents-{workers}", seed)  # starts the agents
            rounds = []
            for round_index in range(ROUNDS):
                for workers, cluster in clusters.items():
                    # a driver per tuple: "warm" is the second sweep of a driver
                    for phases in ((("cold", "warm"), ("resume",), ("cold-resume",)) if workers == 1
                                   else (("resume", "warm"),)):
                        start = time.perf_counter()
                        connect(cluster.address)
                        connect_s = time.perf_counter() - start
                        try:
                            if phases[0].startswith("cold"):
                                stop_agents()
                            for phase in phases:
                                out = Path(work) / f"r{round_index}-{workers}-{phase}"
                                row = {"round": round_index, "workers": workers, "phase": phase,
                                       "connect_s": connect_s,
                                       **timed_sweep(cluster, out, None if phase == "cold" else seed)}
                                rounds.append(row)
                                print(json.dumps(row), flush=True)
                        finally:
                            require_ray().shutdown()
            sample = Path(work) / "r0-1-warm"
            sizes = folder_sizes(sample)
            sizes["driver_records_per_s"] = driver_records_per_s(next((sample / "jobs").glob(f"*.{DEVICE}.json")))
        finally:
            for cluster in clusters.values():
                cluster.stop()

    def rows(workers: int, phase: str) -> list[dict]:
        return [r for r in rounds if r["workers"] == workers and r["phase"] == phase]

    def median_of(workers: int, phase: str, key: str) -> float:
        return statistics.median(r[key] for r in rows(workers, phase))

    def spread(workers: int, phase: str, key: str) -> dict:
        values = [r[key] for r in rows(workers, phase)]
        return {"median": statistics.median(values), "max": max(values), "rounds": values}

    overhead = {"cold": {"handling_per_job_s": spread(1, "cold", "handling_per_job_s")},
                "warm": {"wall_minus_jobs_per_job_s": spread(1, "warm", "overhead_per_job_s"),
                         "handling_per_job_s": spread(1, "warm", "handling_per_job_s")},
                "resume": {"wall_minus_jobs_per_job_s": spread(1, "resume", "overhead_per_job_s"),
                           "handling_per_job_s": spread(1, "resume", "handling_per_job_s")},
                "cold-resume": {"wall_minus_jobs_per_job_s": spread(1, "cold-resume", "overhead_per_job_s"),
                                "handling_per_job_s": spread(1, "cold-resume", "handling_per_job_s")},
                "target_s": OVERHEAD_TARGET_S}
    overhead["met_cold"] = overhead["cold"]["handling_per_job_s"]["max"] < OVERHEAD_TARGET_S
    overhead["met_warm"] = overhead["warm"]["wall_minus_jobs_per_job_s"]["max"] < OVERHEAD_TARGET_S
    overhead["met_resume"] = overhead["resume"]["wall_minus_jobs_per_job_s"]["max"] < OVERHEAD_TARGET_S
    overhead["met_cold_resume"] = overhead["cold-resume"]["wall_minus_jobs_per_job_s"]["max"] < OVERHEAD_TARGET_S
    summary = {"overhead_per_job_s": overhead,
               "jobs_per_min": {phase: {"one_worker": median_of(1, phase, "jobs_per_min"),
                                        "two_workers": median_of(2, phase, "jobs_per_min")}
                                for phase in ("warm", "resume")},
               "job_s_median": {"one_worker": median_of(1, "warm", "job_s") / len(MODELS) / len(VARIANTS),
                                "two_workers": median_of(2, "warm", "job_s") / len(MODELS) / len(VARIANTS)},
               "connect_s_median": statistics.median(r["connect_s"] for r in rounds),
               "worker_start_up_s": start_up,
               "load_average_during": {"min": min(r["load_average_after"][0] for r in rounds),
                                       "max": max(r["load_average_after"][0] for r in rounds)}}
    summary["speedup_two_vs_one"] = {phase: summary["jobs_per_min"][phase]["two_workers"]
                                     / summary["jobs_per_min"][phase]["one_worker"] for phase in ("warm", "resume")}
    record = {"benchmark": "fleet", "method": __doc__.split("\n\n", 1)[1].split("\n\nWrites")[0],
              "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "load_average_before": load_before,
                          "load_average_after": os.getloadavg(), "ray": require_ray().__version__},
              "plan": {"models": MODELS, "variants": VARIANTS, "device": DEVICE, "profile": PROFILE,
                       "rounds_per_cluster": ROUNDS},
              "rounds": rounds, "summary": summary, "sizes": sizes}
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
