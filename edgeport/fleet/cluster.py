"""Fleet runs on a Ray cluster: the Ray executor, `fleet join` and `fleet status`.

A device is a Ray custom resource, `device:<name>`, advertised by the node that is that
device (`edgeport fleet join --device NAME` runs `ray start --resources '{"device:NAME": 1}'`).
A measurement asks for one unit of its device, so Ray places it on such a node and, with the
default of one unit per device, runs one measurement there at a time. A device node joins
with one CPU per unit, and every job asks for one, so an export never runs beside a
measurement and disturbs its timing. A node that joins without a device advertises
`edgeport:export`, one unit per CPU; while the cluster has such nodes, exports run there
only, leaving the devices free to measure. Artifacts reach the nodes through Ray's object
store. A task whose node dies is retried by Ray on another node with the same resources;
when a device's last node is gone, its jobs are failed with that reason instead of waiting
for a node that may never come.

A new driver (every `edgeport sweep`) gets new Ray workers, and a worker's first job would
pay for importing torch and edgeport, seconds per node. So a sweep starts by warming every
node of its measured devices: a task pinned to the node, holding one unit of its device,
prepares a worker there (`prepare_worker`) while the exports run, and the measurements then
reuse that process.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from edgeport.errors import UserError
from edgeport.fleet.jobs import ArtifactBundle, Finished, failure_reason, one_line
from edgeport.fleet.plan import EXPORT_ROW, HOST, MEASURE, Job, check_device_name

RESOURCE_PREFIX = "device:"
EXPORT_RESOURCE = "edgeport:export"  # advertised by nodes that are no device: where exports go
FLEET_EXTRA = "pip install 'edgeport[fleet]'"
RETRIES_ON_NODE_DEATH = 2  # Ray reruns a task whose node died, on another node with the same resources
NODE_REFRESH_S = 0.5  # how stale the executor's view of live nodes may be
CONNECT_TIMEOUT_S = 5.0
ADDRESS = re.compile(r"(?:ray://)?(?P<host>[\w.-]+):(?P<port>\d{1,5})")


def require_ray():
    """The `ray` module, or a UserError naming the extra that installs it."""
    try:
        import ray
    except ImportError as error:
        raise UserError(f"fleet runs on a Ray cluster need Ray, an optional extra: {FLEET_EXTRA}") from error
    return ray


def resource_name(device: str) -> str:
    return RESOURCE_PREFIX + device


def check_address(address: str) -> str:
    """`auto`, `HOST:PORT` or `ray://HOST:PORT`; anything else is a UserError."""
    if address != "auto" and not ADDRESS.fullmatch(address):
        raise UserError(f"cluster address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    return address


LOOPBACK = "127.0.0.1"


def connect(address: str) -> bool:
    """Connect this process to the Ray cluster at `address` as its driver. Returns whether this
    call made the connection (False: the process was connected already, and stays so)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    match = ADDRESS.fullmatch(check_address(address))
    if match:  # fail in seconds with the socket's reason rather than after Ray's long retries
        try:
            socket.create_connection((match["host"], int(match["port"])), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as error:
            raise UserError(f"cannot reach a Ray cluster at {address}: {error.strerror or error}") from None
    # a cluster reached on loopback (one machine, the tests) keeps all its traffic there: the
    # driver then says so, or Ray would announce the machine's external address
    local = {"_node_ip_address": LOOPBACK} if match and match["host"] in (LOOPBACK, "localhost") else {}
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **local)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {one_line(error)}") from None
    return True


@dataclass
class Node:
    """A node of the cluster as Ray reports it: the devices it advertises (name -> units)."""

    node_id: str
    address: str
    hostname: str
    alive: bool
    head: bool
    devices: dict[str, float]
    cpus: float
    export_units: float
    object_store_mb: float


def cluster_nodes() -> list[Node]:
    """Every node the connected cluster knows, live or dead."""
    ray = require_ray()
    nodes = []
    for n in ray.nodes():
        resources = n.get("Resources") or {}
        nodes.append(Node(n["NodeID"], n.get("NodeManagerAddress", ""), n.get("NodeManagerHostname", ""),
                          bool(n.get("Alive")), "node:__internal_head__" in resources,
                          {k.removeprefix(RESOURCE_PREFIX): v for k, v in resources.items()
                           if k.startswith(RESOURCE_PREFIX)},
                          resources.get("CPU", 0.0), resources.get(EXPORT_RESOURCE, 0.0),
                          resources.get("object_store_memory", 0.0) / 2 ** 20))
    return nodes


def status(address: str) -> list[Node]:
    """The nodes of the cluster at `address` and the devices they advertise."""
    made = connect(address)
    try:
        return cluster_nodes()
    finally:
        if made:
            require_ray().shutdown()


def join_argv(device: str | None, *, address: str | None = None, head: bool = False, port: int = 6379,
              units: int = 1, num_cpus: int | None = None, object_store_memory: int | None = None,
              temp_dir: str | None = None, block: bool = False, ray_args: Sequence[str] = ()) -> list[str]:
    """The `ray start` command that makes this machine a node of the fleet at `address` (or its
    head), advertising `device` with `units` measurements at a time. A device node gets one
    CPU per unit unless `num_cpus` says otherwise: every job asks for a CPU, so no export runs
    beside its measurements. A node without a device offers `EXPORT_RESOURCE`, one unit per CPU
    (`num_cpus`, else this machine's count). `ray_args` are passed on to `ray start` as they are."""
    require_ray()
    if head == (address is not None):
        raise UserError("give --address HEAD:PORT to join a fleet, or --head to start one")
    script = Path(sys.executable).with_name("ray")
    ray_script = str(script) if script.is_file() else shutil.which("ray")
    if ray_script is None:
        raise UserError(f"the `ray` command is not installed beside this Python: {FLEET_EXTRA}")
    argv = [ray_script, "start", "--disable-usage-stats"]
    if head:
        argv += ["--head", "--port", str(port), "--include-dashboard=false"]
    else:
        argv += ["--address", check_address(address)]
    if device is not None:
        if check_device_name(device) == HOST:
            raise UserError("'host' names the machine of an in-process sweep; give the node its device's name")
        argv += ["--resources", json.dumps({resource_name(device): units})]
        num_cpus = units if num_cpus is None else num_cpus
    elif units != 1:
        raise UserError("--units counts measurements a device runs at once: it needs --device")
    else:
        argv += ["--resources", json.dumps({EXPORT_RESOURCE: num_cpus if num_cpus is not None else os.cpu_count()})]
    for flag, value in (("--num-cpus", num_cpus), ("--object-store-memory", object_store_memory),
                        ("--temp-dir", temp_dir)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--block"] if block else []) + list(ray_args)


_worker_prepared = False


def prepare_worker() -> None:
    """Make this Ray worker ready to measure, once per process: import what a measurement
    imports, then collect and freeze what is alive into the collector's permanent generation.
    `edgeport.profile` runs a full collection before it times (so that sessions dropped before
    stop spinning); with torch's ~300,000 objects in the process that scans them all, 0.3 s per
    job on a quiet 2-core machine, and none of them can be garbage. Frozen, each collection
    scans only what jobs made since, so it still frees every dropped session. Only for a
    process the fleet owns: frozen objects are never freed."""
    global _worker_prepared
    if not _worker_prepared:
        import onnxruntime  # noqa: F401
        import edgeport.runtime.energy  # noqa: F401
        import edgeport.runtime.profile  # noqa: F401
        import edgeport.sdk  # noqa: F401

        gc.collect()
        gc.freeze()
        _worker_prepared = True


def _run_on_node(function: Callable[..., dict], *args) -> dict:
    """A job as a Ray task: `function` (from `edgeport.fleet.jobs`), told which node it runs on,
    in a prepared worker (preparing is start-up, outside the job's own time, when no warm-up did it)."""
    import ray

    prepare_worker()
    return function(*args, node=ray.get_runtime_context().get_node_id())


class RayExecutor:
    """Runs export and measurement jobs as Ray tasks on the cluster at `address`."""

    def __init__(self, address: str):
        self.ray = require_ray()
        self._connected = connect(address)
        self._task = self.ray.remote(_run_on_node)
        self._nodes: list[Node] = []
        self._refreshed = 0.0
        self._devices_seen: dict[str, set[str]] = {}  # node id -> devices, remembered after it dies
        live = self._refresh(force=True)
        self.measured_devices = {d for n in live for d in n.devices}
        # exports go to the nodes that are no device, if the cluster has any now
        self._exports_apart = any(n.export_units for n in live)
        self._warming: list = []

    def _refresh(self, force: bool = False) -> list[Node]:
        """The live nodes, asked of Ray at most every `NODE_REFRESH_S`."""
        if force or time.monotonic() - self._refreshed > NODE_REFRESH_S:
            self._nodes, self._refreshed = cluster_nodes(), time.monotonic()
            for node in self._nodes:
                if node.alive:
                    self._devices_seen[node.node_id] = set(node.devices)
        return [n for n in self._nodes if n.alive]

    def capacity(self, row: str) -> int:
        """How many jobs of `row` may run at once: export units (else CPUs) for exports, units for a device."""
        live = self._refresh()
        if row == EXPORT_ROW:
            return int(sum(n.export_units if self._exports_apart else n.cpus for n in live))
        return int(sum(n.devices.get(row, 0.0) for n in live))

    def warm_up(self, devices: set[str]) -> None:
        """Prepare a worker for each unit of `devices` on every live node now, so that the
        measurements, which reuse the driver's idle workers, need not start one. Each warm-up
        holds what a measurement would (a unit of the device and a CPU), so none runs beside a
        measurement; a warm-up that fails (its node died) costs nothing but itself."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        prepare = self.ray.remote(prepare_worker)
        for node in self._refresh():
            for device in sorted(devices & set(node.devices)):
                pinned = prepare.options(num_cpus=1, resources={resource_name(device): 1}, max_retries=0,
                                         scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False))
                self._warming += [pinned.remote() for _ in range(int(node.devices[device]))]

    def share(self, bundle: ArtifactBundle):
        return self.ray.put(bundle)

    def start(self, job: Job, function: Callable[..., dict], *args):
        if job.kind == MEASURE:
            resources = {resource_name(job.device): 1}
        else:
            resources = {EXPORT_RESOURCE: 1} if self._exports_apart else {}
        return self._task.options(num_cpus=1, resources=resources, max_retries=RETRIES_ON_NODE_DEATH,
                                  retry_exceptions=False).remote(function, *args)

    def wait(self, handles: list, timeout_s: float) -> list[Finished]:
        """The jobs among `handles` that have finished, waiting up to `timeout_s` for the first."""
        ready, rest = self.ray.wait(handles, num_returns=1, timeout=timeout_s)
        if ready and rest:
            ready += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return [self._outcome(ref) for ref in ready]

    def _outcome(self, ref) -> Finished:
        try:
            return Finished(ref, self.ray.get(ref))
        except self.ray.exceptions.RayTaskError as error:  # the job raised: its own exception says why
            return Finished(ref, None, failure_reason(error.cause if error.cause is not None else error))
        except self.ray.exceptions.RayError as error:  # its node or worker died past the retries
            return Finished(ref, None, f"{type(error).__name__}: {one_line(error)}")

    def lost(self, rows: set[str]) -> dict[str, str]:
        """Why each of `rows` can no longer run: no live node has its device (or any CPU)."""
        reasons = {}
        for row in rows:
            if self.capacity(row) > 0:
                continue
            if row == EXPORT_ROW:
                reasons[row] = "no live node of the cluster that is no device is left to export on" \
                    if self._exports_apart else "no live node of the cluster has a CPU to export on"
                continue
            live = {n.node_id for n in self._refresh()}
            dead = [node[:12] for node, devices in self._devices_seen.items() if row in devices and node not in live]
            reasons[row] = f"no live node advertises device {row!r} any more" + \
                (f" (node {', '.join(dead)} died during the sweep)" if dead else "")
        return reasons

    def cancel(self, handles: list) -> None:
        for ref in handles:
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        self.cancel(self._warming)
        if self._connected:
            self.ray.shutdown()
