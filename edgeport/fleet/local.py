"""The in-process executor: every job runs here, one after another, with no cluster.

It is the embedded default of `edgeport.sweep`: the host is the only device measured, every
other catalog device is estimated. Jobs run when they are started, so `wait` only hands back
what `start` finished; artifacts "travel" as the bundle object itself.
"""
from __future__ import annotations

import platform
from typing import Callable

from edgeport.fleet.jobs import ArtifactBundle, Finished, run_here
from edgeport.fleet.plan import HOST, Job


class InProcessExecutor:
    """Runs each job in this process when it is started; one at a time, so timing has the host to itself."""

    def __init__(self) -> None:
        self.measured_devices = {HOST}
        self.node = f"local:{platform.node()}"
        self._finished: list[Finished] = []

    def capacity(self, row: str) -> int:
        """One job at a time in the whole process: none while a finished one waits to be collected."""
        return 0 if self._finished else 1

    def prepare_devices(self, devices: set[str]) -> None:
        """This process measures, and is running already."""

    def share(self, bundle: ArtifactBundle) -> ArtifactBundle:
        return bundle

    def start(self, job: Job, function: Callable[..., dict], *args) -> object:
        finished = run_here(function, *args, node=self.node)
        finished.handle = object()
        self._finished.append(finished)
        return finished.handle

    def wait(self, handles: list, timeout_s: float) -> list[Finished]:
        done, self._finished = self._finished, []
        return done

    def lost(self, rows: set[str]) -> dict[str, str]:
        return {}

    def cancel(self, handles: list) -> None:
        """Nothing runs in the background here."""

    def close(self) -> None:
        """Nothing to release."""
