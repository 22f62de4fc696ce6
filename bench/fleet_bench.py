"""Fleet benchmark: scheduling overhead per job, and jobs/min with one worker node against two.

Two local Ray clusters run side by side on this machine (`edgeport.fleet.localcluster`): one
with one worker node, one with two, every worker advertising the same device, "bench-node"
(one CPU, one measurement at a time each). Rounds alternate between the clusters, so both
see the same phases of this shared machine. A round is `edgeport.sweep` of 3 zoo models x 3
variants on "bench-node": 9 measurement jobs (200 runs in 2 sessions, 1 runtime thread, no
op profile). Its artifacts were exported once, before the rounds, into a seed folder that
each round's folder copies, so a round schedules and runs measurements only.

Each round connects a driver to a cluster and sweeps twice: "cold", the driver's first sweep,
for which Ray starts a worker process on each node that imports edgeport (and torch) with
the first job, as every `edgeport sweep` command does; and "warm", a second sweep of the same
driver, whose workers are running.

- Scheduling overhead per job, on the one-worker cluster, where jobs run one after another:
  (sweep run time - the sum of the job times) / jobs. The run time is the sweep's wall clock
  from the plan to the written report (sharing the artifacts, Ray's scheduling and transfers,
  writing each job's file and index line, the report); the time to connect to the cluster is
  reported beside it. A job's time is measured inside the job, on the worker (unpacking and
  checking the artifact, then profiling it). Target: under 0.5 s per job. The cold overhead
  minus the warm one is the start-up a sweep pays once per node.
- Jobs per minute = jobs / run time, one worker against two, cold and warm.
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
import tempfile
import time
from pathlib import Path

import edgeport as ep
from edgeport.devices.catalog import cpu_model
from edgeport.fleet.cluster import connect, require_ray
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


def measured_sweep(cluster: LocalCluster, seed: Path, out: Path) -> dict:
    """One round's sweep of the 9 measurements into a copy of `seed`: its times and the nodes used."""
    shutil.copytree(seed, out)
    result = ep.sweep(MODELS, VARIANTS, [DEVICE], out, cluster=cluster.address, **PROFILE)
    assert not result.failed and result.jobs_run == len(MODELS) * len(VARIANTS), result.failed
    nodes = {json.loads((out / j["file"]).read_text())["node"]["node_id"] for j in result.jobs
             if j["kind"] == "measure"}
    return {"jobs": result.jobs_run, "run_s": result.run_s, "job_s": result.job_s, "nodes_used": len(nodes),
            "jobs_per_min": 60 * result.jobs_run / result.run_s,
            "overhead_per_job_s": (result.run_s - result.job_s) / result.jobs_run}


def main() -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as work:
        seed = Path(work) / "seed"
        print("exporting the artifacts once (in this process)", flush=True)
        ep.sweep(MODELS, VARIANTS, ["raspberry-pi-5"], seed, runs=1)
        clusters = {}
        try:
            for workers in (1, 2):
                print(f"starting a cluster with {workers} worker node(s)", flush=True)
                clusters[workers] = start_cluster(workers)
            rounds = []
            for round_index in range(ROUNDS):
                for workers, cluster in clusters.items():
                    start = time.perf_counter()
                    connect(cluster.address)  # one driver for both sweeps: the second finds its workers started
                    connect_s = time.perf_counter() - start
                    try:
                        for phase in ("cold", "warm"):
                            row = {"round": round_index, "workers": workers, "phase": phase, "connect_s": connect_s,
                                   **measured_sweep(cluster, seed, Path(work) / f"r{round_index}-{workers}-{phase}")}
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

    warm = [r["overhead_per_job_s"] for r in rows(1, "warm")]
    # what the first sweep of a driver pays once: Ray starting a worker on the node, importing edgeport there
    start_up = [(c["run_s"] - c["job_s"]) - (w["run_s"] - w["job_s"]) for c, w in zip(rows(1, "cold"), rows(1, "warm"))]
    summary = {"overhead_per_job_s": {"warm": {"median": statistics.median(warm), "max": max(warm), "rounds": warm},
                                      "cold": {"median": median_of(1, "cold", "overhead_per_job_s"),
                                               "rounds": [r["overhead_per_job_s"] for r in rows(1, "cold")]},
                                      "target": OVERHEAD_TARGET_S, "met_warm": max(warm) < OVERHEAD_TARGET_S,
                                      "met_cold": median_of(1, "cold", "overhead_per_job_s") < OVERHEAD_TARGET_S},
               "worker_start_up_once_per_sweep_s": {"median": statistics.median(start_up), "rounds": start_up},
               "jobs_per_min": {phase: {"one_worker": median_of(1, phase, "jobs_per_min"),
                                        "two_workers": median_of(2, phase, "jobs_per_min")}
                                for phase in ("warm", "cold")},
               "job_s_median": {"one_worker": median_of(1, "warm", "job_s") / len(MODELS) / len(VARIANTS),
                                "two_workers": median_of(2, "warm", "job_s") / len(MODELS) / len(VARIANTS)},
               "connect_s_median": statistics.median(r["connect_s"] for r in rounds)}
    summary["speedup_two_vs_one"] = {phase: summary["jobs_per_min"][phase]["two_workers"]
                                     / summary["jobs_per_min"][phase]["one_worker"] for phase in ("warm", "cold")}
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
