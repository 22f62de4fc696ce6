"""Fleet runs on a Ray cluster: the Ray executor, `fleet join` and `fleet status`.

A device is a Ray custom resource, `device:<name>`, advertised by the node that is that
device (`edgeport fleet join --device NAME` runs `ray start --resources '{"device:NAME": 1}'`).
Each unit of a device gets a measuring agent: a Ray actor pinned to its node, holding the
unit and a CPU, that runs one measurement at a time. A device node joins with one CPU per
unit, so nothing else runs beside a measurement and disturbs its timing. A node that joins
without a device advertises `edgeport:export`, one unit per CPU; while the cluster has such
nodes, exports (Ray tasks) run there only. Artifacts reach the nodes through Ray's object
store. An export whose node dies is retried by Ray on another node; a measurement whose agent
dies (with its node) is handed back to the sweep to run on another agent of the same device;
when a device's last node is gone, its jobs are failed with that reason instead of waiting
for a node that may never come.

Agents are detached: they outlive the sweep that started them, because Ray gives every new
driver (every `edgeport sweep`) new workers, and a new worker pays seconds importing torch
and edgeport before its first job. The first sweep after a node joins starts its agents at
once, so that they prepare (`prepare_worker`) while the exports run; later sweeps find them
ready. An agent's name carries a fingerprint of edgeport's source: a sweep of other code
stops the agents it cannot use and starts its own.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from edgeport.errors import UserError
from edgeport.fleet.jobs import ArtifactBundle, Finished, failure_reason, one_line
from edgeport.fleet.plan import EXPORT_ROW, HOST, MEASURE, Job, check_device_name

RESOURCE_PREFIX = "device:"
AGENT_NAMESPACE = "edgeport-fleet"
EXPORT_RESOURCE = "edgeport:export"  # advertised by nodes that are no device: where exports go
FLEET_EXTRA = "pip install 'edgeport[fleet]'"
RETRIES_ON_NODE_DEATH = 2  # a job whose node died runs again, on another node with the same device
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


def check_reachable(address: str) -> re.Match | None:
    """Refuse a HOST:PORT address that takes no TCP connection within CONNECT_TIMEOUT_S, with
    the socket's reason, rather than after Ray's long retries; returns the address's match
    (None for a form without a port to try, such as `auto`)."""
    match = ADDRESS.fullmatch(check_address(address))
    if match:
        try:
            socket.create_connection((match["host"], int(match["port"])), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as error:
            raise UserError(f"cannot reach a Ray cluster at {address}: {error.strerror or error}") from None
    return match


def connect(address: str) -> bool:
    """Connect this process to the Ray cluster at `address` as its driver. Returns whether this
    call made the connection (False: the process was connected already, and stays so)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    match = check_reachable(address)
    # a cluster reached on loopback (one machine, the tests) keeps all its traffic there: the
    # driver then says so, or Ray would announce the machine's external address
    local = {"_node_ip_address": LOOPBACK} if match and match["host"] in (LOOPBACK, "localhost") else {}
    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **local)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {one_line(error)}") from None
    if main_thread and on_sigterm is not None:
        # Ray's driver installs its own SIGTERM handler, which dumps and aborts: the caller's
        # (the CLI's stops the running jobs and leaves whole files, as Ctrl-C does) comes back
        signal.signal(signal.SIGTERM, on_sigterm)
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
    stop spinning); with torch's ~320,000 objects in the process that scans them all, 0.26 s
    per job on this project's 2-core VM (bench/fleet_bench.py), and none of them can be garbage. Frozen, each collection
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
    """An export as a Ray task: `function` (from `edgeport.fleet.jobs`), told which node it runs on."""
    import ray

    prepare_worker()
    return function(*args, node=ray.get_runtime_context().get_node_id())


class DeviceAgent:
    """The process that measures on one unit of a device node, across sweeps (a detached Ray actor)."""

    def __init__(self) -> None:
        prepare_worker()

    def run(self, function: Callable[..., dict], *args) -> dict:
        """Run a job function (`edgeport.fleet.jobs.measure_job`), told which node it runs on."""
        import ray

        return function(*args, node=ray.get_runtime_context().get_node_id())


def code_fingerprint() -> str:
    """16 hex digits of the sha256 of edgeport's own source files: agents run the code of the
    sweep that started them, so a sweep uses only agents that carry its own fingerprint."""
    import edgeport

    root, digest = Path(edgeport.__file__).parent, hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def agent_name(device: str, node_id: str, unit: int, fingerprint: str) -> str:
    """The agent of `unit` of `device` on node `node_id`, running the code of `fingerprint`."""
    return f"{device}@{node_id}#{unit}~{fingerprint}"


def stop_agents(keep: str | None = None, timeout_s: float = 30.0) -> int:
    """Kill the measuring agents on the connected cluster, but those whose name carries the
    fingerprint `keep`, and wait (up to `timeout_s`) until Ray has let their names go, so that
    agents started next are new ones. Returns how many were killed."""
    ray = require_ray()

    def stale() -> set[str]:
        return {entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
                if entry["namespace"] == AGENT_NAMESPACE and (keep is None or not entry["name"].endswith("~" + keep))}

    killed, deadline = stale(), time.monotonic() + timeout_s
    for name in killed:
        try:
            ray.kill(ray.get_actor(name, namespace=AGENT_NAMESPACE))
        except ValueError:  # died meanwhile
            pass
    while stale() & killed and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(killed)


@dataclass(eq=False)
class _Agent:
    """An agent this executor measures on: its device, its node, and the actor's handle."""

    device: str
    node_id: str
    actor: object


class RayExecutor:
    """Runs exports as Ray tasks and measurements on the devices' agents, on the cluster at `address`."""

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
        self._agents: list[_Agent] = []
        self._measuring: dict[object, tuple[_Agent, str]] = {}  # job's ref -> its agent and the job's key
        self._attempts: dict[str, int] = {}  # job key -> times started
        self._agent_deaths: dict[str, str] = {}  # device -> why its last agent to die did

    def _refresh(self, force: bool = False) -> list[Node]:
        """The live nodes, asked of Ray at most every `NODE_REFRESH_S`."""
        if force or time.monotonic() - self._refreshed > NODE_REFRESH_S:
            self._nodes, self._refreshed = cluster_nodes(), time.monotonic()
            for node in self._nodes:
                if node.alive:
                    self._devices_seen[node.node_id] = set(node.devices)
        return [n for n in self._nodes if n.alive]

    def _live_agents(self, device: str) -> list[_Agent]:
        live = {n.node_id for n in self._refresh()}
        return [a for a in self._agents if a.device == device and a.node_id in live]

    def capacity(self, row: str) -> int:
        """How many jobs of `row` may run at once: export units (else CPUs) for exports, live agents for a device."""
        if row == EXPORT_ROW:
            if self._exports_apart:
                return int(sum(n.export_units for n in self._refresh()))
            held = {}  # each agent holds a CPU of its node for its life: a measurement runs alone there
            for agent in self._agents:
                held[agent.node_id] = held.get(agent.node_id, 0) + 1
            return int(sum(max(0.0, n.cpus - held.get(n.node_id, 0)) for n in self._refresh()))
        return len(self._live_agents(row))

    def prepare_devices(self, devices: set[str]) -> None:
        """Find, or start, an agent for each unit of `devices` on every live node. Starting
        returns at once: an agent prepares while the exports run, and its first measurement
        waits for that only if none are left to run."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        fingerprint = code_fingerprint()
        stop_agents(keep=fingerprint)
        agent_class = self.ray.remote(DeviceAgent)
        for node in self._refresh():
            for device in sorted(devices & set(node.devices)):
                for unit in range(int(node.devices[device])):
                    actor = agent_class.options(
                        name=agent_name(device, node.node_id, unit, fingerprint), namespace=AGENT_NAMESPACE,
                        get_if_exists=True, lifetime="detached", max_restarts=0, num_cpus=1,
                        resources={resource_name(device): 1},
                        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote()
                    self._agents.append(_Agent(device, node.node_id, actor))

    def share(self, bundle: ArtifactBundle):
        return self.ray.put(bundle)

    def start(self, job: Job, function: Callable[..., dict], *args):
        """Start an export as a task, a measurement on an idle agent of its device (`capacity` says one is)."""
        if job.kind != MEASURE:
            return self._task.options(num_cpus=1, resources={EXPORT_RESOURCE: 1} if self._exports_apart else {},
                                      max_retries=RETRIES_ON_NODE_DEATH, retry_exceptions=False).remote(function, *args)
        busy = {agent for agent, _ in self._measuring.values()}
        agent = next(a for a in self._live_agents(job.device) if a not in busy)
        self._attempts[job.key] = self._attempts.get(job.key, 0) + 1
        ref = agent.actor.run.remote(function, *args)
        self._measuring[ref] = (agent, job.key)
        return ref

    def wait(self, handles: list, timeout_s: float) -> list[Finished]:
        """The jobs among `handles` that have finished, waiting up to `timeout_s` for the first."""
        ready, rest = self.ray.wait(handles, num_returns=1, timeout=timeout_s)
        if ready and rest:
            ready += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return [self._outcome(ref) for ref in ready]

    def _outcome(self, ref) -> Finished:
        agent, key = self._measuring.pop(ref, (None, ""))
        try:
            return Finished(ref, self.ray.get(ref))
        except self.ray.exceptions.RayTaskError as error:  # the job raised: its own exception says why
            return Finished(ref, None, failure_reason(error.cause if error.cause is not None else error))
        except self.ray.exceptions.RayActorError as error:  # the agent died, most likely with its node
            reason = f"{type(error).__name__}: {one_line(error)}"
            if not isinstance(error, self.ray.exceptions.ActorUnavailableError):  # that one may come back
                self._agents.remove(agent)
                self._agent_deaths[agent.device] = reason
            return Finished(ref, None, reason, retry=self._attempts[key] <= RETRIES_ON_NODE_DEATH)
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
                    if self._exports_apart else ("every CPU of the cluster is held by a device's agent (a measurement "
                                                 "runs alone on its node): join a node without --device to export on "
                                                 "(edgeport fleet join --address HEAD:PORT), or give a device node "
                                                 "--num-cpus above its --units")
                continue
            live = {n.node_id for n in self._refresh() if row in n.devices}
            if live:  # the nodes are there, their agents are not
                reasons[row] = f"every agent of device {row!r} died, the last: {self._agent_deaths.get(row, '?')}"
                continue
            dead = [node[:12] for node, devices in self._devices_seen.items() if row in devices and node not in live]
            reasons[row] = f"no live node advertises device {row!r} any more" + \
                (f" (node {', '.join(dead)} died during the sweep)" if dead else "")
        return reasons

    def cancel(self, handles: list) -> None:
        """Stop the jobs of `handles`: an export's worker is killed; an agent is asked to stop
        (Ray kills no actor for one call), and stays for the next sweep."""
        for ref in handles:
            self.ray.cancel(ref, force=ref not in self._measuring)

    def close(self) -> None:
        """Disconnect, if this executor connected; the agents stay."""
        if self._connected:
            self.ray.shutdown()
