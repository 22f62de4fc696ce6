"""Energy meters behind one interface: a measurement window you begin and end (as Zeus does).

    meter = detect_meter()            # NVML, RAPL, Jetson INA3221 rails, or none
    meter.begin(); ...work...; joules = meter.end(); seconds = meter.window_s

Counters (NVML mJ, RAPL µJ) are differenced across the window; RAPL wraps at
`max_energy_range_uj`, so a sampling thread reads it often enough to see every wrap.
Rails (hwmon) give power, which the sampling thread integrates over time (trapezoid).
sysfs trees are read through a configurable root, so the parsing is testable anywhere.
Every reading says which meter produced it; a meter that cannot be read raises
`MeterUnavailable`, one that reads something physically impossible (negative power or
energy, more than `HOST_PEAK_WATTS`, a wrap range too small to correct) raises `MeterError`,
and the profiler then reports energy as unavailable, with the reason.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeport.errors import EdgeportError, UserError, finite_at_least

SAMPLE_INTERVAL_S = 0.05
SAMPLER_THREAD = "edgeport-energy-sampler"  # the thread that polls a meter while a window is open
INA3221_CHANNELS = (1, 2, 3)  # mainline driver: in1-3 bus mV, curr1-3 mA; in4-7 and curr4 are shunt and sum channels

# The most power a meter here may report, in watts. Meters run on the host, which has no
# catalog entry, so this is a generous constant rather than a device figure: twice the 1000 W
# worst case Zeus's RAPL wraparound tracker plans for (spiking_and_energy.md §7.2), and almost
# three times the largest board in catalog.toml (H100/H200 SXM, 700 W TDP). Above it, a reading
# is garbage, not a measurement.
HOST_PEAK_WATTS = 2000.0
PEAK_SOURCE = "edgeport.runtime.energy.HOST_PEAK_WATTS: twice Zeus's 1000 W RAPL worst case"


class MeterUnavailable(EdgeportError):
    """No meter, or one that cannot be read here (missing, permission denied, MIG, ...)."""


class MeterError(EdgeportError):
    """A meter produced an impossible reading (negative, above peak power, backwards without a wrap)."""


def _finite_at_least(value: float, least: float, what: str, strictly: bool = False) -> float:
    """`value` if it is a finite number above `least` (or equal to it unless `strictly`); else a
    UserError naming `what`: a NaN bound would let every reading through, an infinite window never
    closes, and a window of NaN seconds holds no inference to divide by."""
    if not finite_at_least(value, least, strictly):
        bound = f"above {least:g}" if strictly else f"{least:g} or more"
        raise UserError(f"{what} must be a finite number {bound}, not {value!r}")
    return value


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
    """A source of energy readings over a window; `name` is the provenance, e.g. 'measured:rapl'.

    `window_s` is the length of the last closed window in seconds, timed at the readings that
    bound it, so energy / window_s is a power over exactly the interval the energy covers.
    """

    name = "none"
    update_period_s = 0.0  # the window should be much longer than this
    window_s = 0.0

    def __init__(self, peak_watts: float = HOST_PEAK_WATTS):
        self.peak_watts = _finite_at_least(peak_watts, 0, "a meter's peak_watts (W)", strictly=True)

    @abstractmethod
    def begin(self) -> None:
        """Start a measurement window."""

    @abstractmethod
    def end(self) -> float:
        """Close the window; returns the energy in joules spent during it, and sets `window_s`."""

    def abort(self) -> None:
        """Give up an open window without a reading (the work in it failed); nothing keeps running."""

    def shortest_window_s(self) -> float:
        """The shortest window in seconds worth reading: 10 of the meter's updates (§7: ≥ 10 counter
        updates). A shorter one may see no update at all (0 J) or one update's worth of energy
        spent before it began, so its power can be off by the whole reading."""
        return 10 * self.update_period_s

    def _refuse_frozen(self, joules: float, seconds: float) -> None:
        """Raise MeterError for no energy at all over a window of more than two of the meter's
        updates: a powered chip draws something in each, so the meter is not updating (a
        virtual machine may expose RAPL files that never move)."""
        if joules == 0 and seconds > 2 * self.update_period_s:
            raise MeterError(f"{self.name}: no energy over {seconds:.3f} s: the meter is not updating")

    def _refuse_implausible(self, joules: float, seconds: float, source: str) -> None:
        """Raise MeterError unless `joules` over `seconds` lies between 0 and the peak power.

        One update period of slack, because a counter read just after it ticked may include
        energy spent just before the interval began.
        """
        if joules < 0:
            raise MeterError(f"{source}: {joules:.6g} J over {seconds:.3f} s is negative energy")
        if joules > self.peak_watts * (seconds + self.update_period_s):
            raise MeterError(f"{source}: {joules:.6g} J over {seconds:.3f} s is above the {self.peak_watts:g} W "
                             f"a meter here can report ({PEAK_SOURCE})")


class _Sampler(Meter):
    """A meter whose `sample()` is polled in a thread while the window is open.

    `clock` gives seconds (monotonic); tests pass a fake one to drive the window by hand.
    """

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S, peak_watts: float = HOST_PEAK_WATTS,
                 clock: Callable[[], float] = time.perf_counter):
        super().__init__(peak_watts)
        self.interval_s = _finite_at_least(interval_s, 0, "a meter's sampling interval_s (s)", strictly=True)
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @abstractmethod
    def _first_reading(self) -> None:
        """Read the meter at the start of a window."""

    @abstractmethod
    def _accumulate(self, step_s: float) -> None:
        """Read the meter again, `step_s` seconds after the previous reading, and accumulate."""

    @abstractmethod
    def total_joules(self) -> float:
        """Energy accumulated since `start`."""

    def start(self) -> None:
        """Take the first reading."""
        self._first_reading()
        self.started_at = self.sampled_at = self.clock()

    def sample(self) -> None:
        """Take one more reading and accumulate."""
        now = self.clock()
        self._accumulate(now - self.sampled_at)
        self.sampled_at = now

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
        self._thread = threading.Thread(target=self._loop, name=SAMPLER_THREAD, daemon=True)
        self._thread.start()

    def _stop_sampling(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def abort(self) -> None:
        self._stop_sampling()

    def end(self) -> float:
        self._stop_sampling()
        if self._error:
            raise self._error
        self.sample()
        self.window_s = self.sampled_at - self.started_at
        joules = self.total_joules()
        self._refuse_frozen(joules, self.window_s)
        return joules


def _read_text(path: Path) -> str:
    """A sysfs attribute's text, stripped; one that cannot be read or decoded makes the meter unavailable."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except PermissionError as error:
        hint = (" (RAPL energy counters are root-only since CVE-2020-8694; run as root or make the tree readable)"
                if path.name == "energy_uj" else "")
        raise MeterUnavailable(f"permission denied reading {path}{hint}") from error
    except UnicodeDecodeError as error:
        raise MeterUnavailable(f"cannot read {path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise MeterUnavailable(f"cannot read {path}: {error.strerror or error}") from error


def _read_int(path: Path) -> int:
    text = _read_text(path)
    try:
        return int(text)
    except ValueError as error:
        raise MeterUnavailable(f"cannot read {path}: {text[:40]!r} is not an integer") from error


class RaplMeter(_Sampler):
    """Intel/AMD RAPL package energy through powercap sysfs (`energy_uj`, µJ, wrapping).

    Only top-level domains named `package-N` count: `psys` (platform) already includes the
    packages, and subdomains (core, uncore, dram) are parts of them.
    """

    name = "measured:rapl"
    update_period_s = 0.001

    def __init__(self, root: str | Path = "/sys/class/powercap", interval_s: float = SAMPLE_INTERVAL_S,
                 peak_watts: float = HOST_PEAK_WATTS, clock: Callable[[], float] = time.perf_counter):
        super().__init__(interval_s, peak_watts, clock)
        root = Path(root)
        top_level = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        self.domains = [d for d in top_level if _read_text(d / "name").startswith("package")]
        if not self.domains:
            raise MeterUnavailable(f"no RAPL package domains under {root}")
        self.wrap = {d: self._read_range(d) for d in self.domains}
        for d in self.domains:
            self._read_counter(d)  # fail now, not mid-window, if unreadable or out of range

    def _read_range(self, domain: Path) -> int:
        """`max_energy_range_uj`, refused unless a sampling step at peak power fits in half of it:
        counter_delta reads a drop as a wrap only within half the range, so a smaller range
        would make a wrap indistinguishable from garbage."""
        path = domain / "max_energy_range_uj"
        wrap_at = _read_int(path)
        if wrap_at <= 0:
            raise MeterError(f"{path} reads {wrap_at}: a counter's range must be positive")
        needed = 2 * self._step_ceiling_uj(self.interval_s)
        if wrap_at < needed:
            raise MeterError(f"{path} reads {wrap_at} µJ, too small to correct wraparound: a {self.interval_s:g} s "
                             f"sampling step at {self.peak_watts:g} W needs at least {needed:.0f} µJ")
        return wrap_at

    def _read_counter(self, domain: Path) -> int:
        path = domain / "energy_uj"
        microjoules = _read_int(path)
        if microjoules < 0:
            raise MeterError(f"{path} reads {microjoules}: a negative energy counter")
        if microjoules > self.wrap[domain]:
            raise MeterError(f"{path} reads {microjoules} µJ, above its own wrap point "
                             f"max_energy_range_uj = {self.wrap[domain]}")
        return microjoules

    def _step_ceiling_uj(self, step_s: float) -> float:
        return self.peak_watts * (step_s + self.update_period_s) * 1e6

    def _first_reading(self) -> None:
        self.last = {d: self._read_counter(d) for d in self.domains}
        self.microjoules = 0

    def _accumulate(self, step_s: float) -> None:
        readings = {d: self._read_counter(d) for d in self.domains}
        step_uj = sum(counter_delta(self.last[d], readings[d], self.wrap[d]) for d in self.domains)
        # counter_delta's reading of a drop as one wrap is only sound while a step at peak power
        # spans under half the range; a sample delayed past that could hide a wrap.
        for d in self.domains:
            if 2 * self._step_ceiling_uj(step_s) > self.wrap[d]:
                raise MeterError(f"{d / 'energy_uj'} was sampled {step_s:.3f} s after the previous reading: at "
                                 f"{self.peak_watts:g} W it could have wrapped unseen (max_energy_range_uj = "
                                 f"{self.wrap[d]})")
        self._refuse_implausible(step_uj / 1e6, step_s, " + ".join(str(d / "energy_uj") for d in self.domains))
        self.last = readings
        self.microjoules += step_uj

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


def _rail_label(label_file: Path, fallback: str) -> str:
    return _read_text(label_file) if label_file.exists() else fallback


def find_rails(root: str | Path = "/sys/class/hwmon") -> list[Rail]:
    """INA3221 rails under a hwmon root (Jetson): older `ina3221x` trees give `in_power<N>_input`
    in mW; mainline `ina3221` trees give `in<N>_input` (mV) and `curr<N>_input` (mA) for channels
    1-3 only: in4-in6 are shunt voltages and in7 their sum (µV), curr4 the sum of the currents,
    so pairing in4 with curr4 would add a rail that does not exist. Disabled channels are left out.

    A `name` or label file that cannot be read as UTF-8 text raises MeterUnavailable: without
    it the board-total rail cannot be told from the others.
    """
    rails = []
    for device in sorted(Path(root).glob("hwmon*")):
        driver = _read_text(device / "name") if (device / "name").exists() else ""
        if not driver.startswith("ina3221"):
            continue
        for power in sorted(device.glob("in_power*_input")):
            n = power.name.removeprefix("in_power").removesuffix("_input")
            rails.append(Rail(_rail_label(device / f"rail_name_{n}", f"{device.name}/rail{n}"), (power,), 1e-3))
        for n in INA3221_CHANNELS:
            volts, current = device / f"in{n}_input", device / f"curr{n}_input"
            if volts.exists() and current.exists() and _channel_enabled(device, n):
                rails.append(Rail(_rail_label(device / f"in{n}_label", f"{device.name}/in{n}"), (volts, current), 1e-6))
    return rails


def _channel_enabled(device: Path, n: int) -> bool:
    """Whether mainline INA3221 channel `n` is on: `in<n>_enable` reads 0 for a channel switched off,
    whose readings fail (ENODATA); a driver without the file has every channel on."""
    enable = device / f"in{n}_enable"
    return not enable.exists() or _read_text(enable) != "0"


def total_rails(rails: list[Rail]) -> list[Rail]:
    """The rails that measure the whole board (labels with 'total', 'system' or '_in', as Zeus
    reads them: VDD_IN on Orin, POM_5V_IN on the Nano and TX2), else all."""
    whole = [r for r in rails if any(k in r.label.lower() for k in ("total", "system", "_in"))]
    return whole or rails


class HwmonMeter(_Sampler):
    """Jetson-style INA3221 rails: power sampled in a thread and integrated (trapezoid)."""

    name = "measured:hwmon"
    update_period_s = 0.1

    def __init__(self, root: str | Path = "/sys/class/hwmon", interval_s: float = SAMPLE_INTERVAL_S,
                 peak_watts: float = HOST_PEAK_WATTS, clock: Callable[[], float] = time.perf_counter):
        super().__init__(interval_s, peak_watts, clock)
        self.rails = total_rails(find_rails(root))
        if not self.rails:
            raise MeterUnavailable(f"no INA3221 rails under {root}")
        self._power()

    def _power(self) -> float:
        """Watts of the board now: the rails' sum, refused if a rail is negative or the sum above peak."""
        total = 0.0
        for rail in self.rails:
            watts = rail.watts()
            if watts < 0:
                raise MeterError(f"rail {rail.label} ({', '.join(map(str, rail.files))}) reads {watts:.6g} W: "
                                 f"negative power")
            total += watts
        if total > self.peak_watts:
            files = ", ".join(str(f) for rail in self.rails for f in rail.files)
            raise MeterError(f"rails {files} read {total:.6g} W, above the {self.peak_watts:g} W a meter here can "
                             f"report ({PEAK_SOURCE})")
        return total

    def _first_reading(self) -> None:
        self.joules, self.last_watts = 0.0, self._power()

    def _accumulate(self, step_s: float) -> None:
        watts = self._power()
        self.joules += (watts + self.last_watts) / 2 * step_s
        self.last_watts = watts

    def total_joules(self) -> float:
        return self.joules


class NvmlMeter(Meter):
    """NVIDIA GPU total-energy counter (mJ, Volta or newer); updates about every 100 ms."""

    name = "measured:nvml"
    update_period_s = 0.1

    def __init__(self, index: int = 0, peak_watts: float = HOST_PEAK_WATTS):
        super().__init__(peak_watts)
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
        self.index = index
        self.nvml = pynvml

    def _millijoules(self) -> int:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def begin(self) -> None:
        self.start_mj, self.started_at = self._millijoules(), time.perf_counter()

    def end(self) -> float:
        joules = (self._millijoules() - self.start_mj) / 1e3
        self.window_s = time.perf_counter() - self.started_at
        self._refuse_implausible(joules, self.window_s, f"NVML total-energy counter of GPU {self.index}")
        self._refuse_frozen(joules, self.window_s)
        return joules


def detect_meter(rapl_root: str | Path = "/sys/class/powercap", hwmon_root: str | Path = "/sys/class/hwmon",
                 gpu: bool = False) -> tuple[Meter | None, list[str]]:
    """The first meter that works here (NVML when `gpu`, else RAPL, then INA3221 rails).

    Returns (meter or None, why each candidate was not usable). A candidate whose first
    readings are impossible (MeterError) is as unusable as one that cannot be read.
    """
    reasons = []
    candidates = ([lambda: NvmlMeter()] if gpu else []) + [lambda: RaplMeter(rapl_root), lambda: HwmonMeter(hwmon_root)]
    for make in candidates:
        try:
            return make(), reasons
        except (MeterUnavailable, MeterError) as error:
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
        """Gross energy per inference in mJ: everything the meter read over the window."""
        return 1e3 * self.gross_joules / self.inferences

    @property
    def net_mj_per_inference(self) -> float:
        """Net energy per inference in mJ: the window's energy less idle power over its length."""
        return 1e3 * self.net_joules / self.inferences


def measure_idle_watts(meter: Meter, seconds: float) -> float:
    """Average power in watts over `seconds` of doing nothing (model loaded, nothing running), or
    over the meter's `shortest_window_s()` where that is longer: an idle window shorter than the
    counter's update period reads 0 J (NVML, 100 ms) and would subtract no idle power at all.

    Divides by the meter's own window, so time spent starting its sampler is on both sides.
    """
    seconds = _finite_at_least(seconds, 0, "the idle window (idle_s, seconds)", strictly=True)
    meter.begin()
    try:
        time.sleep(max(seconds, meter.shortest_window_s()))
    except BaseException:
        meter.abort()
        raise
    joules = meter.end()
    return joules / meter.window_s


def measure_energy(meter: Meter, work: Callable[[], object], min_window_s: float = 1.0,
                   idle_s: float = 1.0) -> EnergyMeasurement:
    """Idle power first (over `idle_s` seconds; 0 skips it), then `work()` repeated, at least once,
    until the window lasts `min_window_s` seconds.

    `work()` runs one inference. Both windows are at least the meter's `shortest_window_s()` (10
    update periods); the measured window's length, and the idle energy subtracted over it, are
    the meter's own window, so gross and net joules cover exactly the interval the meter read.
    A `work()` that raises closes the window (no sampler keeps polling) and the error propagates.
    """
    min_window_s = _finite_at_least(min_window_s, 0, "the energy window (min_window_s, seconds)")
    idle_s = _finite_at_least(idle_s, 0, "the idle window (idle_s, seconds)")
    idle = measure_idle_watts(meter, idle_s) if idle_s > 0 else 0.0
    window = max(min_window_s, meter.shortest_window_s())
    count = 0
    meter.begin()
    try:
        start = time.perf_counter()
        while count == 0 or time.perf_counter() - start < window:
            work()
            count += 1
    except BaseException:
        meter.abort()
        raise
    joules = meter.end()
    return EnergyMeasurement(meter.name, count, meter.window_s, joules, idle, joules - idle * meter.window_s)
