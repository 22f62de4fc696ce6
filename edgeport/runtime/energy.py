"""Energy meters behind one interface: a measurement window you begin and end (as Zeus does).

    meter = detect_meter()            # NVML, RAPL, Jetson INA3221 rails, or none
    meter.begin(); ...work...; joules = meter.end()

Counters (NVML mJ, RAPL µJ) are differenced across the window; RAPL wraps at
`max_energy_range_uj`, so a sampling thread reads it often enough to see every wrap.
Rails (hwmon) give power, which the sampling thread integrates over time (trapezoid).
sysfs trees are read through a configurable root, so the parsing is testable anywhere.
Every reading says which meter produced it; a meter that cannot be read raises
`MeterUnavailable`, and the profiler then reports energy as unavailable, with the reason.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from edgeport.errors import EdgeportError

SAMPLE_INTERVAL_S = 0.05


class MeterUnavailable(EdgeportError):
    """No meter, or one that cannot be read here (missing, permission denied, MIG, ...)."""


class MeterError(EdgeportError):
    """A meter produced an impossible reading (a counter that went backwards without a wrap)."""


def counter_delta(previous: int, current: int, wrap_at: int) -> int:
    """Increase of a cumulative counter that wraps to 0 after `wrap_at`.

    A reading below the previous one is a wrap only if the implied increase is under half
    the range (a sampler reading at least every few seconds never sees more); otherwise
    the counter went backwards, which is an error, not energy.
    """
    if current >= previous:
        return current - previous
    wrapped = wrap_at - previous + current
    if wrap_at <= 0 or wrapped > wrap_at // 2:
        raise MeterError(f"counter went backwards from {previous} to {current} without a wrap (range {wrap_at})")
    return wrapped


class Meter(ABC):
    """A source of energy readings over a window; `name` is the provenance, e.g. 'measured:rapl'."""

    name = "none"
    update_period_s = 0.0  # the window should be much longer than this

    @abstractmethod
    def begin(self) -> None:
        """Start a measurement window."""

    @abstractmethod
    def end(self) -> float:
        """Close the window; returns the energy in joules spent during it."""


class _Sampler(Meter):
    """A meter whose `sample()` is polled in a thread while the window is open."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @abstractmethod
    def start(self) -> None:
        """Take the first reading."""

    @abstractmethod
    def sample(self) -> None:
        """Take one more reading and accumulate."""

    @abstractmethod
    def total_joules(self) -> float:
        """Energy accumulated since `start`."""

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self.sample()
        except BaseException as error:  # re-raised in end(), on the caller's thread
            self._error = error

    def begin(self) -> None:
        self.start()
        self._stop.clear()
        self._error = None
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def end(self) -> float:
        self._stop.set()
        self._thread.join()
        if self._error:
            raise self._error
        self.sample()
        return self.total_joules()


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except PermissionError as error:
        raise MeterUnavailable(f"permission denied reading {path} (energy counters are root-only since "
                               f"CVE-2020-8694; run as root or make the tree readable)") from error
    except (OSError, ValueError) as error:
        raise MeterUnavailable(f"cannot read {path}: {error}") from error


class RaplMeter(_Sampler):
    """Intel/AMD RAPL package energy through powercap sysfs (`energy_uj`, µJ, wrapping)."""

    name = "measured:rapl"
    update_period_s = 0.001

    def __init__(self, root: str | Path = "/sys/class/powercap", interval_s: float = SAMPLE_INTERVAL_S):
        super().__init__(interval_s)
        root = Path(root)
        self.domains = sorted(p for p in root.glob("intel-rapl:*") if ":" in p.name and p.name.count(":") == 1)
        if not self.domains:
            raise MeterUnavailable(f"no RAPL package domains under {root}")
        self.wrap = {d: _read_int(d / "max_energy_range_uj") for d in self.domains}
        for d in self.domains:
            _read_int(d / "energy_uj")  # fail now, not mid-window, if unreadable

    def start(self) -> None:
        self.last = {d: _read_int(d / "energy_uj") for d in self.domains}
        self.microjoules = 0

    def sample(self) -> None:
        for d in self.domains:
            current = _read_int(d / "energy_uj")
            self.microjoules += counter_delta(self.last[d], current, self.wrap[d])
            self.last[d] = current

    def total_joules(self) -> float:
        return self.microjoules / 1e6


@dataclass
class Rail:
    """One power rail: how to read its power in watts."""

    label: str
    files: tuple[Path, ...]  # (power file,) or (voltage mV file, current mA file)
    watts_per_unit: float  # multiplies the reading (or the mV x mA product)

    def watts(self) -> float:
        values = [_read_int(f) for f in self.files]
        product = values[0] if len(values) == 1 else values[0] * values[1]
        return product * self.watts_per_unit


def find_rails(root: str | Path = "/sys/class/hwmon") -> list[Rail]:
    """INA3221 rails under a hwmon root (Jetson): older `ina3221x` trees give `in_power<N>_input`
    in mW; mainline `ina3221` trees give `in<N>_input` (mV) and `curr<N>_input` (mA)."""
    rails = []
    for device in sorted(Path(root).glob("hwmon*")):
        driver = (device / "name").read_text().strip() if (device / "name").exists() else ""
        if not driver.startswith("ina3221"):
            continue
        for power in sorted(device.glob("in_power*_input")):
            n = power.name.removeprefix("in_power").removesuffix("_input")
            label_file = device / f"rail_name_{n}"
            label = label_file.read_text().strip() if label_file.exists() else f"{device.name}/rail{n}"
            rails.append(Rail(label, (power,), 1e-3))
        for volts in sorted(device.glob("in[0-9]*_input")):
            n = volts.name.removeprefix("in").removesuffix("_input")
            current = device / f"curr{n}_input"
            if current.exists():
                label_file = device / f"in{n}_label"
                label = label_file.read_text().strip() if label_file.exists() else f"{device.name}/in{n}"
                rails.append(Rail(label, (volts, current), 1e-6))
    return rails


def total_rails(rails: list[Rail]) -> list[Rail]:
    """The rails that measure the whole board (labels with 'total', 'system' or VDD_IN), else all."""
    whole = [r for r in rails if any(k in r.label.lower() for k in ("total", "system", "vdd_in"))]
    return whole or rails


class HwmonMeter(_Sampler):
    """Jetson-style INA3221 rails: power sampled in a thread and integrated (trapezoid)."""

    name = "measured:hwmon"
    update_period_s = 0.1

    def __init__(self, root: str | Path = "/sys/class/hwmon", interval_s: float = SAMPLE_INTERVAL_S):
        super().__init__(interval_s)
        self.rails = total_rails(find_rails(root))
        if not self.rails:
            raise MeterUnavailable(f"no INA3221 rails under {root}")
        self._power()

    def _power(self) -> float:
        return sum(r.watts() for r in self.rails)

    def start(self) -> None:
        self.joules, self.last_time, self.last_watts = 0.0, time.perf_counter(), self._power()

    def sample(self) -> None:
        now, watts = time.perf_counter(), self._power()
        self.joules += (watts + self.last_watts) / 2 * (now - self.last_time)
        self.last_time, self.last_watts = now, watts

    def total_joules(self) -> float:
        return self.joules


class NvmlMeter(Meter):
    """NVIDIA GPU total-energy counter (mJ, Volta or newer); updates about every 100 ms."""

    name = "measured:nvml"
    update_period_s = 0.1

    def __init__(self, index: int = 0):
        try:
            import pynvml
        except ImportError as error:
            raise MeterUnavailable("NVML bindings are not installed (pip install nvidia-ml-py)") from error
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except pynvml.NVMLError as error:
            raise MeterUnavailable(f"NVML cannot read GPU {index}'s energy counter: {error}") from error
        try:
            mig_enabled = pynvml.nvmlDeviceGetMigMode(self.handle)[0]
        except pynvml.NVMLError:  # GPUs without MIG support say so by raising
            mig_enabled = 0
        if mig_enabled:
            raise MeterUnavailable("MIG is enabled: NVML reports no energy for MIG slices")
        self.nvml = pynvml

    def _millijoules(self) -> int:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def begin(self) -> None:
        self.start_mj = self._millijoules()

    def end(self) -> float:
        return (self._millijoules() - self.start_mj) / 1e3


def detect_meter(rapl_root: str | Path = "/sys/class/powercap", hwmon_root: str | Path = "/sys/class/hwmon",
                 gpu: bool = False) -> tuple[Meter | None, list[str]]:
    """The first meter that works here (NVML when `gpu`, else RAPL, then INA3221 rails).

    Returns (meter or None, why each candidate was not usable).
    """
    reasons = []
    candidates = ([lambda: NvmlMeter()] if gpu else []) + [lambda: RaplMeter(rapl_root), lambda: HwmonMeter(hwmon_root)]
    for make in candidates:
        try:
            return make(), reasons
        except MeterUnavailable as error:
            reasons.append(str(error))
    return None, reasons


@dataclass
class EnergyMeasurement:
    """Energy of a timed window, gross and with idle power subtracted."""

    provenance: str  # 'measured:rapl', 'measured:nvml', 'measured:hwmon'
    inferences: int
    window_s: float
    gross_joules: float
    idle_watts: float
    net_joules: float  # gross - idle_watts * window_s

    @property
    def gross_mj_per_inference(self) -> float:
        return 1e3 * self.gross_joules / self.inferences

    @property
    def net_mj_per_inference(self) -> float:
        return 1e3 * self.net_joules / self.inferences


def measure_idle_watts(meter: Meter, seconds: float) -> float:
    """Average power over `seconds` of doing nothing (model loaded, nothing running)."""
    meter.begin()
    start = time.perf_counter()
    time.sleep(seconds)
    joules = meter.end()
    return joules / (time.perf_counter() - start)


def measure_energy(meter: Meter, work, min_window_s: float = 1.0, idle_s: float = 1.0) -> EnergyMeasurement:
    """Idle power first, then `work()` repeated until the window lasts `min_window_s`.

    `work()` runs one inference. The window is at least 10 meter update periods long.
    """
    idle = measure_idle_watts(meter, idle_s) if idle_s > 0 else 0.0
    window = max(min_window_s, 10 * meter.update_period_s)
    count = 0
    meter.begin()
    start = time.perf_counter()
    while time.perf_counter() - start < window:
        work()
        count += 1
    joules = meter.end()
    elapsed = time.perf_counter() - start
    return EnergyMeasurement(meter.name, count, elapsed, joules, idle, joules - idle * elapsed)
