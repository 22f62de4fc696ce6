"""A Ray cluster of several nodes on one machine: a fleet to try sweeps on, test and benchmark them.

Each node is `edgeport fleet join --block` in a process group of its own, with a Ray folder of
its own (nodes sharing one race for its socket and log names). `kill` ends exactly one node's
processes, the way a device that loses power does; `stop` ends them all. Nothing else of Ray
on the machine is touched (`ray stop` would end every Ray process of the user).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Ray's defaults notice a dead node after about half a minute; a local fleet wants seconds.
# Every node on loopback: the test cluster's traffic never leaves 127.0.0.1 (Ray would otherwise
# announce the machine's external address and talk through it).
ON_LOOPBACK = ("--node-ip-address", "127.0.0.1")
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4",
                      "RAY_health_check_initial_delay_ms": "0"}


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalCluster:
    """Ray nodes on this machine: `start_head()`, then `join(name, device)` per device node.

    Every node gets `num_cpus` CPUs and an object store of `object_store_bytes`; use as a
    context manager, or call `stop()`, to end them.
    """

    def __init__(self, num_cpus: int = 1, object_store_bytes: int = 100 * 2 ** 20):
        self.num_cpus, self.object_store_bytes = num_cpus, object_store_bytes
        self.port, self.client_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"  # `ray://127.0.0.1:{client_port}` reaches it through Ray's client
        self.nodes: dict[str, tuple[subprocess.Popen, Path]] = {}

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _start(self, name: str, *args: str, ray_args: tuple[str, ...] = (), env: dict | None = None) -> None:
        # Ray's socket paths must stay under 108 bytes: a short folder per node, under /tmp
        folder = Path(tempfile.mkdtemp(prefix=f"epf-{name[:6]}-", dir="/tmp"))
        with open(folder / "node.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "edgeport", "fleet", "join", *args, "--num-cpus", str(self.num_cpus),
                 "--object-store-memory", str(self.object_store_bytes), "--temp-dir", str(folder), "--block",
                 "--", *ON_LOOPBACK, *ray_args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
        self.nodes[name] = (process, folder)

    def start_head(self, timeout_s: float = 120) -> None:
        """Start the head (no device: it exports) and wait until it accepts connections."""
        self._start("head", "--head", "--port", str(self.port),
                    ray_args=("--ray-client-server-port", str(self.client_port)), env=FAST_HEALTH_CHECKS)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.nodes["head"][0].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the head did not start:\n{self.log('head')}") from None
                time.sleep(0.5)

    def join(self, name: str, device: str) -> None:
        """Start a node called `name` advertising `device`."""
        self._start(name, "--address", self.address, "--device", device)

    def wait_for(self, devices: set[str], nodes_each: int = 1, timeout_s: float = 180) -> dict[str, str]:
        """{device: a node id} once `nodes_each` live nodes advertise each of `devices` (this
        process must be connected, see `edgeport.fleet.cluster.connect`)."""
        from edgeport.fleet.cluster import cluster_nodes

        deadline = time.monotonic() + timeout_s
        while True:
            live: dict[str, list[str]] = {}
            for node in (n for n in cluster_nodes() if n.alive):
                for device in node.devices:
                    live.setdefault(device, []).append(node.node_id)
            if all(len(live.get(d, [])) >= nodes_each for d in devices):
                return {d: ids[0] for d, ids in live.items()}
            if time.monotonic() > deadline:
                raise RuntimeError(f"no node for {sorted(devices - set(live))} after {timeout_s:.0f} s:\n"
                                   + "\n".join(self.log(name) for name in self.nodes))
            time.sleep(0.5)

    def log(self, name: str) -> str:
        """The end of a node's `ray start` output."""
        return f"--- {name}:\n" + (self.nodes[name][1] / "node.log").read_text(errors="replace")[-3000:]

    def workers(self, name: str) -> dict[int, str]:
        """The node's live Ray workers: pid -> the process title Ray gives it, `ray::IDLE`, or
        `ray::<function>` while it runs a task. They run in sessions of their own and are named
        by pid in the node's own log folder."""
        titles = {}
        for log in self.nodes[name][1].glob("session_*/logs/worker-*.out"):
            pid = int(log.stem.rsplit("-", 1)[-1])
            try:  # the pid may have been reused since: only a Ray worker is ours
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except FileNotFoundError:
                continue
            if title.startswith("ray::"):
                titles[pid] = title
        return titles

    def kill(self, name: str) -> None:
        """End one node's processes at once: its `ray start` group (raylet, object store, agents)
        and its Ray workers."""
        process = self.nodes[name][0]
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)
        for pid in self.workers(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Kill every node started here and remove their folders."""
        for name in list(self.nodes):
            self.kill(name)
            shutil.rmtree(self.nodes.pop(name)[1], ignore_errors=True)
