"""Fleet runs: export once, measure on every device, on this machine or on a Ray cluster.

- `plan.py`: models x variants x targets x devices as jobs with stable keys;
- `jobs.py`: the work of one job (export, measure, estimate), runnable on any node;
- `local.py`: the in-process executor (the embedded default: the host is the measured device);
- `cluster.py`: the Ray executor, `fleet join` (a node advertising its device) and `fleet status`;
- `results.py`: the results folder (one JSON per job, the append-only index, the artifacts);
- `report.py`: the page comparing variants across devices;
- `sweep.py`: `edgeport.sweep`, the driver that walks a plan with an executor.

Ray is an optional extra (`pip install 'edgeport[fleet]'`), imported only for a cluster.
"""
from edgeport.fleet.sweep import ProgressEvent, SweepResult, sweep

__all__ = ["ProgressEvent", "SweepResult", "sweep"]
