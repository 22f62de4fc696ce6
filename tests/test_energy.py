"""Energy meters read real sysfs-shaped trees built here (this machine has no counters); the
estimate path prices real ONNX graphs on catalog entries and on devices made here."""
import json
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeport.devices import catalog
from edgeport.devices.catalog import Device
from edgeport.devices.estimate import estimate
from edgeport.errors import EdgeportError, UserError
from edgeport.runtime.energy import (HOST_PEAK_WATTS, SAMPLER_THREAD, EnergyMeasurement, HwmonMeter, MeterError,
                                     NvmlMeter, RaplMeter, counter_delta, detect_meter, find_rails, measure_energy,
                                     measure_idle_watts)

RAPL_RANGE_UJ = 262_143_328_850  # a real package domain's max_energy_range_uj


def write(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")
    return path


def rapl_tree(root: Path, energy_uj: int, max_range: int = RAPL_RANGE_UJ) -> Path:
    domain = root / "intel-rapl:0"
    write(domain / "name", "package-0")
    write(domain / "max_energy_range_uj", max_range)
    write(domain / "intel-rapl:0:0" / "energy_uj", 5)  # a subdomain (core): not counted twice
    return write(domain / "energy_uj", energy_uj)


class FakeClock:
    """Seconds that pass only when a test says so, to drive a sampler's window by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_counter_delta_handles_wrap_and_rejects_backwards():
    assert counter_delta(100, 250, 1000) == 150
    assert counter_delta(900, 50, 1000) == 150  # wrapped once at 1000
    with pytest.raises(MeterError, match="went backwards"):
        counter_delta(600, 500, 1000)  # 100 down is not a wrap: it would mean 900 up


def test_rapl_joules_across_a_wrap(tmp_path):
    counter = rapl_tree(tmp_path, RAPL_RANGE_UJ - 1_000_000)
    clock = FakeClock()
    meter = RaplMeter(tmp_path, clock=clock)
    meter.start()
    for reading in (RAPL_RANGE_UJ - 500_000, 2_000_000, 7_000_000):  # wraps between the 1st and 2nd reading
        clock.now += 0.05
        counter.write_text(f"{reading}\n")
        meter.sample()
    assert meter.total_joules() == pytest.approx(1.0 + 7.0)


def test_rapl_window_with_the_sampling_thread(tmp_path):
    counter = rapl_tree(tmp_path, 1_000)
    meter = RaplMeter(tmp_path, interval_s=0.01)
    meter.begin()
    counter.write_text("2501000\n")  # +2.5 J during the window
    time.sleep(0.05)
    assert meter.end() == pytest.approx(2.5)
    assert meter.window_s >= 0.05


def test_a_counter_that_never_moves_is_an_error_not_zero_energy(tmp_path):
    """A virtual machine may expose RAPL files that never change: zero energy over a window of
    many updates is no measurement."""
    rapl_tree(tmp_path, 1_000)
    meter = RaplMeter(tmp_path, interval_s=0.01)
    meter.begin()
    time.sleep(0.05)
    with pytest.raises(MeterError, match="no energy over .* the meter is not updating"):
        meter.end()


def test_rapl_backwards_counter_is_an_error(tmp_path):
    counter = rapl_tree(tmp_path, 5_000_000, max_range=1_000_000_000)
    meter = RaplMeter(tmp_path)
    meter.start()
    counter.write_text("4000000\n")
    with pytest.raises(MeterError):
        meter.sample()


def test_rapl_counts_packages_only_not_psys(tmp_path):
    """psys (platform) already contains the packages; counting both would double the energy."""
    counter = rapl_tree(tmp_path, 1_000_000)
    write(tmp_path / "intel-rapl:1" / "name", "psys")
    write(tmp_path / "intel-rapl:1" / "max_energy_range_uj", RAPL_RANGE_UJ)
    platform = write(tmp_path / "intel-rapl:1" / "energy_uj", 1_000_000)
    clock = FakeClock()
    meter = RaplMeter(tmp_path, clock=clock)
    assert [d.name for d in meter.domains] == ["intel-rapl:0"]
    meter.start()
    clock.now = 1.0
    counter.write_text("3000000\n")
    platform.write_text("9000000\n")
    meter.sample()
    assert meter.total_joules() == pytest.approx(2.0)


def jetson_old(root: Path, milliwatts: dict[str, int]) -> None:
    device = root / "hwmon3"
    write(device / "name", "ina3221x")
    for i, (label, mw) in enumerate(milliwatts.items()):
        write(device / f"rail_name_{i}", label)
        write(device / f"in_power{i}_input", mw)


def jetson_mainline(root: Path, rails: dict[str, tuple[int, int]]) -> None:
    device = root / "hwmon1"
    write(device / "name", "ina3221")
    for i, (label, (mv, ma)) in enumerate(rails.items(), start=1):
        write(device / f"in{i}_label", label)
        write(device / f"in{i}_input", mv)
        write(device / f"curr{i}_input", ma)
    write(root / "hwmon0" / "name", "cpu_thermal")  # other hwmon devices are ignored


def test_rails_in_milliwatts(tmp_path):
    jetson_old(tmp_path, {"VDD_IN": 5000, "VDD_CPU_GPU_CV": 2000, "VDD_SOC": 1000})
    rails = find_rails(tmp_path)
    assert [r.label for r in rails] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    meter = HwmonMeter(tmp_path)
    assert [r.label for r in meter.rails] == ["VDD_IN"]  # the board total, not the sum of all rails
    assert meter._power() == pytest.approx(5.0)
    nano = tmp_path / "nano"  # the Jetson Nano's and TX2's board input rail
    jetson_old(nano, {"POM_5V_IN": 9000, "POM_5V_GPU": 2000, "POM_5V_CPU": 1500})
    assert HwmonMeter(nano)._power() == pytest.approx(9.0)


@pytest.mark.serial
def test_rails_in_millivolts_and_milliamps_integrate_to_joules(tmp_path):
    jetson_mainline(tmp_path, {"VDD_IN": (5000, 1200), "VDD_CPU_GPU_CV": (5000, 400)})
    meter = HwmonMeter(tmp_path, interval_s=0.01)
    assert meter._power() == pytest.approx(6.0)  # 5 V x 1.2 A
    meter.begin()
    time.sleep(0.2)
    start = time.perf_counter()
    joules = meter.end()
    assert joules == pytest.approx(6.0 * meter.window_s)  # constant power over the meter's own window
    assert meter.window_s >= 0.2
    assert time.perf_counter() - start < 0.1


def test_measure_energy_reports_gross_and_net(tmp_path):
    jetson_mainline(tmp_path, {"VDD_IN": (5000, 1000)})  # a constant 5 W: all of it idle
    meter = HwmonMeter(tmp_path, interval_s=0.01)
    result = measure_energy(meter, lambda: time.sleep(0.001), min_window_s=0.2, idle_s=0.1)
    assert result.provenance == "measured:hwmon" and result.inferences > 10
    assert result.window_s >= 0.2
    assert result.idle_watts == pytest.approx(5.0, rel=0.05)
    assert result.gross_joules == pytest.approx(5.0 * result.window_s, rel=0.1)
    assert abs(result.net_joules) < 0.1 * result.gross_joules


def test_detect_meter_without_counters_says_why(tmp_path):
    meter, reasons = detect_meter(tmp_path / "powercap", tmp_path / "hwmon")
    assert meter is None and any("RAPL" in r for r in reasons) and any("INA3221" in r for r in reasons)


def attempt(call) -> str:
    """What `call()` did, as text that survives a fork: 'returned ...' or 'ErrorType: message'.

    Anything but an edgeport error propagates (in a child: comes back as 'crash: ...').
    """
    try:
        return f"returned {call()!r}"
    except EdgeportError as error:
        return f"{type(error).__name__}: {error}"


def attempt_as_ordinary_user(tmp_path: Path, call) -> str:
    """`attempt(call)` by a user whom file modes stop: 'nobody', in a child process, when we are root."""
    if os.geteuid() != 0:
        return attempt(call)
    for folder in (tmp_path, *tmp_path.parents):
        if folder == Path("/"):
            break
        folder.chmod(folder.stat().st_mode | 0o005)  # let the other user reach the files themselves
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            os.setgid(65534)
            os.setuid(65534)
            message = attempt(call)
        except BaseException as error:
            message = f"crash: {error!r}"
        os.write(write_end, json.dumps(message).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    return json.loads(os.read(read, 65536).decode())


def detection(tmp_path: Path) -> tuple[str | None, list[str]]:
    meter, reasons = detect_meter(tmp_path / "powercap", tmp_path / "hwmon")
    return (meter.name if meter else None), reasons


def test_permission_denied_is_reported_not_raised(tmp_path):
    """A root-only counter read by an ordinary user, as RAPL is since CVE-2020-8694."""
    counter = rapl_tree(tmp_path, 1000)
    counter.chmod(0o000)
    outcome = attempt_as_ordinary_user(tmp_path, lambda: RaplMeter(tmp_path))
    assert outcome.startswith("MeterUnavailable: permission denied") and str(counter) in outcome
    assert "CVE-2020-8694" in outcome


def make_not_utf8(path: Path) -> None:
    path.write_bytes(b"ina3221\xff\xfe\n")


def make_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def make_unreadable(path: Path) -> None:
    path.chmod(0o000)


DAMAGE = {"not UTF-8": (make_not_utf8, "not UTF-8 text"), "a directory": (make_directory, "Is a directory"),
          "unreadable": (make_unreadable, "permission denied")}
NAME_FILES = {  # meter, tree builder, the file that names the driver, domain or rail
    "hwmon name": (HwmonMeter, "hwmon", lambda root: jetson_old(root, {"VDD_IN": 5000}), "hwmon3/name"),
    "hwmon rail_name_0": (HwmonMeter, "hwmon", lambda root: jetson_old(root, {"VDD_IN": 5000}), "hwmon3/rail_name_0"),
    "hwmon in1_label": (HwmonMeter, "hwmon", lambda root: jetson_mainline(root, {"VDD_IN": (5000, 1000)}),
                        "hwmon1/in1_label"),
    "RAPL name": (RaplMeter, "powercap", lambda root: rapl_tree(root, 1000), "intel-rapl:0/name"),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name_file", NAME_FILES)
def test_a_bad_name_file_makes_the_meter_unavailable_with_the_reason(tmp_path, name_file, damage):
    meter_class, tree, build, relative = NAME_FILES[name_file]
    spoil, reason = DAMAGE[damage]
    build(tmp_path / tree)
    broken = tmp_path / tree / relative
    spoil(broken)
    outcome = attempt_as_ordinary_user(tmp_path, lambda: meter_class(tmp_path / tree))
    assert outcome.startswith("MeterUnavailable:") and str(broken) in outcome and reason in outcome
    outcome = attempt_as_ordinary_user(tmp_path, lambda: detection(tmp_path))
    assert outcome.startswith("returned (None, [") and str(broken) in outcome and reason in outcome


@pytest.mark.parametrize("build, bad_file, reason", [
    (lambda root: jetson_old(root, {"VDD_IN": -5000}), "hwmon3/in_power0_input", "negative power"),
    (lambda root: jetson_mainline(root, {"VDD_IN": (5000, -1000)}), "hwmon1/curr1_input", "negative power"),
    (lambda root: jetson_old(root, {"VDD_IN": 10 ** 30}), "hwmon3/in_power0_input",
     f"above the {HOST_PEAK_WATTS:g} W"),
    (lambda root: jetson_mainline(root, {"VDD_IN": (5000, 10 ** 12)}), "hwmon1/curr1_input",
     f"above the {HOST_PEAK_WATTS:g} W"),
], ids=["negative mW", "negative mA", "1e30 mW", "5 V x 1e9 A"])
def test_impossible_rail_power_is_an_error_not_a_measurement(tmp_path, build, bad_file, reason):
    build(tmp_path / "hwmon")
    with pytest.raises(MeterError) as raised:
        HwmonMeter(tmp_path / "hwmon")
    assert str(tmp_path / "hwmon" / bad_file) in str(raised.value) and reason in str(raised.value)
    meter, reasons = detect_meter(tmp_path / "powercap", tmp_path / "hwmon")
    assert meter is None and any(str(tmp_path / "hwmon" / bad_file) in r and reason in r for r in reasons)


def test_rail_power_turning_absurd_mid_window_fails_the_window(tmp_path):
    jetson_old(tmp_path, {"VDD_IN": 5000})
    meter = HwmonMeter(tmp_path, interval_s=0.01)
    meter.begin()
    write(tmp_path / "hwmon3" / "in_power0_input", 10 ** 30)
    time.sleep(0.03)
    with pytest.raises(MeterError, match="above the 2000 W") as raised:
        meter.end()
    assert str(tmp_path / "hwmon3" / "in_power0_input") in str(raised.value)


def test_rail_power_is_bounded_by_the_given_peak(tmp_path):
    """A caller that knows the board (a 60 W Jetson mode) can bound the meter by it."""
    jetson_old(tmp_path, {"VDD_IN": 100_000})
    assert HwmonMeter(tmp_path)._power() == pytest.approx(100.0)
    with pytest.raises(MeterError, match="above the 60 W") as raised:
        HwmonMeter(tmp_path, peak_watts=60)
    assert str(tmp_path / "hwmon3" / "in_power0_input") in str(raised.value)


@pytest.mark.parametrize("energy_uj, max_range, bad_file, reason", [
    (-1, RAPL_RANGE_UJ, "energy_uj", "negative energy counter"),
    (RAPL_RANGE_UJ + 1, RAPL_RANGE_UJ, "energy_uj", "above its own wrap point"),
    (1000, 0, "max_energy_range_uj", "must be positive"),
    (1000, -262_143_328_850, "max_energy_range_uj", "must be positive"),
    (1000, 10_000_000, "max_energy_range_uj", "too small to correct wraparound"),
], ids=["negative energy_uj", "energy_uj above its range", "zero range", "negative range", "10 J range"])
def test_impossible_rapl_files_are_errors_at_detection(tmp_path, energy_uj, max_range, bad_file, reason):
    rapl_tree(tmp_path / "powercap", energy_uj, max_range)
    with pytest.raises(MeterError) as raised:
        RaplMeter(tmp_path / "powercap")
    assert str(tmp_path / "powercap" / "intel-rapl:0" / bad_file) in str(raised.value) and reason in str(raised.value)
    meter, reasons = detect_meter(tmp_path / "powercap", tmp_path / "hwmon")
    assert meter is None and any(bad_file in r and reason in r for r in reasons)


@pytest.mark.parametrize("jump_uj, max_range", [
    (46 * 10 ** 15, 2 ** 63),  # 46 GJ in 1 s, under a range wide enough to hold it
    (10 * 10 ** 9, RAPL_RANGE_UJ),  # 10 kJ in 1 s: 10 kW
], ids=["46 GJ", "10 kJ"])
def test_rapl_jump_above_peak_power_is_an_error(tmp_path, jump_uj, max_range):
    counter = rapl_tree(tmp_path, 1000, max_range)
    clock = FakeClock()
    meter = RaplMeter(tmp_path, clock=clock)
    meter.start()
    clock.now = 1.0
    counter.write_text(f"{1000 + jump_uj}\n")
    with pytest.raises(MeterError, match=f"over 1.000 s is above the {HOST_PEAK_WATTS:g} W") as raised:
        meter.sample()
    assert str(counter) in str(raised.value)
    assert meter.total_joules() == 0  # the impossible step was not added


def test_rapl_jump_in_a_real_window_fails_the_window(tmp_path):
    counter = rapl_tree(tmp_path, 1000, max_range=2 ** 63)
    meter = RaplMeter(tmp_path, interval_s=0.01)
    meter.begin()
    counter.write_text(f"{1000 + 46 * 10 ** 15}\n")
    time.sleep(0.03)
    with pytest.raises(MeterError, match="is above the 2000 W") as raised:
        meter.end()
    assert str(counter) in str(raised.value)


def test_rapl_sample_too_late_to_rule_out_a_wrap_is_an_error(tmp_path):
    """1 kJ of range is enough for 50 ms steps at 2 kW, not for a step of 1 s: a wrap could hide in it."""
    counter = rapl_tree(tmp_path, 1000, max_range=1_000_000_000)
    clock = FakeClock()
    meter = RaplMeter(tmp_path, clock=clock)
    meter.start()
    clock.now = 1.0
    counter.write_text("2000\n")
    with pytest.raises(MeterError, match="could have wrapped unseen") as raised:
        meter.sample()
    assert str(counter) in str(raised.value)


def fake_nvml(readings_mj: list[int]) -> SimpleNamespace:
    """Just enough of pynvml for NvmlMeter: a total-energy counter that returns `readings_mj` in turn."""
    class NVMLError(Exception):
        pass

    def no_mig(handle):
        raise NVMLError("not supported")

    counter = iter(readings_mj)
    return SimpleNamespace(NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda index: index,
                           nvmlDeviceGetTotalEnergyConsumption=lambda handle: next(counter),
                           nvmlDeviceGetMigMode=no_mig)


@pytest.mark.parametrize("end_mj, reason", [
    (9_000_000, "negative energy"),  # the counter restarted (driver reload) mid-window
    (10_000_000 + 46 * 10 ** 12, "is above the 2000 W"),  # 46 GJ in a fraction of a second
], ids=["backwards", "46 GJ"])
def test_nvml_impossible_window_is_an_error(monkeypatch, end_mj, reason):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([10_000_000, 10_000_000, end_mj]))
    meter = NvmlMeter()
    meter.begin()
    with pytest.raises(MeterError, match=reason) as raised:
        meter.end()
    assert "NVML total-energy counter of GPU 0" in str(raised.value)


def test_nvml_window_in_joules(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([10_000_000, 10_000_000, 10_000_250]))
    meter = NvmlMeter()
    meter.begin()
    time.sleep(0.01)
    assert meter.end() == pytest.approx(0.25) and meter.window_s >= 0.01


# --- multi-socket and mixed RAPL trees, laid out as /sys/devices/virtual/powercap with the flat
# --- /sys/class/powercap symlinks the kernel makes for every zone and subzone

def powercap_tree(root: Path, zones: dict[str, tuple[str, int, int]]) -> Path:
    """A sysfs-shaped powercap tree: `zones` maps a zone id ("intel-rapl:0", "intel-rapl:0:0",
    "intel-rapl-mmio:0") to (name, energy_uj, max_energy_range_uj). Zones live nested under their
    parent in devices/virtual/powercap, as the kernel lays them out; class/powercap, the root a
    meter reads, holds one symlink per zone. Returns that class folder."""
    devices, class_dir = root / "devices" / "virtual" / "powercap", root / "class" / "powercap"
    class_dir.mkdir(parents=True)
    for zone, (name, energy_uj, max_range) in zones.items():
        control, _, _ = zone.partition(":")
        parts = zone.split(":")
        nested = devices / control / ":".join(parts[:2])
        if len(parts) == 3:
            nested = nested / zone
        write(nested / "name", name)
        write(nested / "energy_uj", energy_uj)
        write(nested / "max_energy_range_uj", max_range)
        (class_dir / zone).symlink_to(nested, target_is_directory=True)
    (class_dir / "intel-rapl").symlink_to(devices / "intel-rapl", target_is_directory=True)  # the control type
    return class_dir


def counter_of(class_dir: Path, zone: str) -> Path:
    return class_dir / zone / "energy_uj"


DRAM_RANGE_UJ = 65_712_999_613  # a real dram subzone's max_energy_range_uj (smaller than the package's)


def two_socket_server(root: Path) -> Path:
    return powercap_tree(root, {
        "intel-rapl:0": ("package-0", RAPL_RANGE_UJ - 1_000_000, RAPL_RANGE_UJ),
        "intel-rapl:0:0": ("dram", 10_000_000, DRAM_RANGE_UJ),
        "intel-rapl:1": ("package-1", 50_000_000, RAPL_RANGE_UJ),
        "intel-rapl:1:0": ("dram", 20_000_000, DRAM_RANGE_UJ),
    })


def test_rapl_sums_both_sockets_each_with_its_own_wrap(tmp_path):
    """Two packages (a dual-socket server) are both counted, dram subzones are not, and a wrap of
    one package's counter does not disturb the other's."""
    powercap = two_socket_server(tmp_path)
    clock = FakeClock()
    meter = RaplMeter(powercap, clock=clock)
    assert [d.name for d in meter.domains] == ["intel-rapl:0", "intel-rapl:1"]
    meter.start()
    clock.now = 0.05
    counter_of(powercap, "intel-rapl:0").write_text("2000000\n")  # wrapped: +1 J up to the range, +2 J after
    counter_of(powercap, "intel-rapl:1").write_text("54000000\n")  # +4 J
    counter_of(powercap, "intel-rapl:0:0").write_text("999000000\n")  # dram moves a lot: part of no package sum
    meter.sample()
    assert meter.total_joules() == pytest.approx(3.0 + 4.0)


def test_rapl_client_with_psys_core_uncore_and_mmio_counts_the_package_once(tmp_path):
    """A laptop: package-0 with core/uncore subzones, psys beside it, and the same package again
    through the MMIO interface (intel-rapl-mmio:0). Only intel-rapl:0 is energy of the package."""
    powercap = powercap_tree(tmp_path, {
        "intel-rapl:0": ("package-0", 1_000_000, RAPL_RANGE_UJ),
        "intel-rapl:0:0": ("core", 1_000_000, RAPL_RANGE_UJ),
        "intel-rapl:0:1": ("uncore", 1_000_000, RAPL_RANGE_UJ),
        "intel-rapl:1": ("psys", 1_000_000, RAPL_RANGE_UJ),
        "intel-rapl-mmio:0": ("package-0", 1_000_000, RAPL_RANGE_UJ),
    })
    clock = FakeClock()
    meter = RaplMeter(powercap, clock=clock)
    assert [d.name for d in meter.domains] == ["intel-rapl:0"]
    meter.start()
    clock.now = 0.05
    for zone in ("intel-rapl:0", "intel-rapl:0:0", "intel-rapl:0:1", "intel-rapl:1", "intel-rapl-mmio:0"):
        counter_of(powercap, zone).write_text("1500000\n")
    meter.sample()
    assert meter.total_joules() == pytest.approx(0.5)


def test_rapl_without_a_package_zone_is_unavailable_not_psys(tmp_path):
    powercap = powercap_tree(tmp_path, {"intel-rapl:0": ("psys", 1_000, RAPL_RANGE_UJ)})
    meter, reasons = detect_meter(powercap, tmp_path / "hwmon")
    assert meter is None and any(f"no RAPL package domains under {powercap}" in r for r in reasons)


def test_one_root_only_socket_makes_rapl_unavailable_not_half_the_energy(tmp_path):
    """Counting package-0 alone when package-1 cannot be read would report half a server's energy."""
    powercap = two_socket_server(tmp_path)
    hidden = tmp_path / "devices" / "virtual" / "powercap" / "intel-rapl" / "intel-rapl:1" / "energy_uj"
    hidden.chmod(0o400)  # root-only, as the kernel sets it since CVE-2020-8694
    outcome = attempt_as_ordinary_user(tmp_path, lambda: detection(tmp_path / "class"))
    assert outcome.startswith("returned (None, [") and "permission denied" in outcome
    assert "intel-rapl:1/energy_uj" in outcome and "CVE-2020-8694" in outcome


# --- INA3221 channels that are not rails


def test_mainline_ina3221_shunt_and_sum_channels_are_no_rails(tmp_path):
    """The mainline driver also exposes in4-in6 (shunt µV), in7 (their sum, labelled) and curr4
    (the sum of currents). Paired as in4 x curr4 they would add a 32 W rail that does not exist."""
    device = tmp_path / "hwmon1"
    write(device / "name", "ina3221")
    for n, (mv, ma) in {1: (5000, 1000), 2: (5000, 400), 3: (5000, 200)}.items():  # unlabelled channels
        write(device / f"in{n}_input", mv)
        write(device / f"curr{n}_input", ma)
    write(device / "in4_input", 20_000)
    write(device / "in7_input", 30_000)
    write(device / "in7_label", "sum of shunt voltages")
    write(device / "curr4_input", 1_600)
    assert [r.label for r in find_rails(tmp_path)] == ["hwmon1/in1", "hwmon1/in2", "hwmon1/in3"]
    assert HwmonMeter(tmp_path)._power() == pytest.approx(5.0 + 2.0 + 1.0)


def test_a_disabled_ina3221_channel_is_no_rail(tmp_path):
    """A channel switched off (in3_enable = 0) fails every read (ENODATA), as a directory does here."""
    jetson_mainline(tmp_path, {"VDD_CPU": (5000, 400), "VDD_GPU": (5000, 200), "VDD_SOC": (5000, 100)})
    write(tmp_path / "hwmon1" / "in3_enable", 0)
    make_directory(tmp_path / "hwmon1" / "in3_input")
    assert [r.label for r in find_rails(tmp_path)] == ["VDD_CPU", "VDD_GPU"]
    assert HwmonMeter(tmp_path)._power() == pytest.approx(3.0)


# --- windows: bounds, failures, and the counter's update period


@pytest.mark.parametrize("arguments, named", [
    ({"min_window_s": float("nan")}, "min_window_s"), ({"min_window_s": -1.0}, "min_window_s"),
    ({"min_window_s": "1"}, "min_window_s"), ({"idle_s": float("nan")}, "idle_s"),
    ({"idle_s": float("inf")}, "idle_s"), ({"idle_s": -0.5}, "idle_s"),
], ids=["NaN window", "negative window", "text window", "NaN idle", "infinite idle", "negative idle"])
def test_impossible_windows_are_user_errors(tmp_path, arguments, named):
    """A NaN window once ran no inference and then divided by zero; each is one clear line now."""
    counter = rapl_tree(tmp_path, 1_000)
    meter = RaplMeter(tmp_path, interval_s=0.01)
    with pytest.raises(UserError, match=f"{named}.* must be a finite number"):
        measure_energy(meter, lambda: counter.write_text(f"{int(counter.read_text()) + 1000}\n"), **arguments)
    assert not sampler_threads()


@pytest.mark.parametrize("make, named", [
    (lambda root: RaplMeter(root, peak_watts=float("nan")), "peak_watts"),
    (lambda root: RaplMeter(root, peak_watts=0), "peak_watts"),
    (lambda root: RaplMeter(root, interval_s=0), "interval_s"),
    (lambda root: RaplMeter(root, interval_s=float("nan")), "interval_s"),
    (lambda root: HwmonMeter(root, peak_watts=-60), "peak_watts"),
], ids=["NaN peak", "zero peak", "zero interval", "NaN interval", "negative peak"])
def test_impossible_meter_settings_are_user_errors(tmp_path, make, named):
    """A NaN peak let a 46 GJ jump through as a measurement; a zero interval spins a core."""
    rapl_tree(tmp_path, 1_000)
    jetson_old(tmp_path, {"VDD_IN": 5000})
    with pytest.raises(UserError, match=f"{named}.* must be a finite number above 0"):
        make(tmp_path)


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == SAMPLER_THREAD and t.is_alive()]


def test_work_that_fails_mid_window_leaves_no_sampler_running(tmp_path):
    """A runner that raises in the window: the error reaches the caller and the meter's polling
    thread stops with it, instead of reading sysfs every 50 ms for the rest of the process."""
    jetson_old(tmp_path, {"VDD_IN": 5000})
    meter = HwmonMeter(tmp_path, interval_s=0.01)
    calls = []

    def fails_on_third_call():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the runtime lost its session")

    with pytest.raises(RuntimeError, match="lost its session"):
        measure_energy(meter, fails_on_third_call, min_window_s=0.2, idle_s=0)
    assert len(calls) == 3 and not sampler_threads()
    meter.begin()  # the meter can open the next window
    assert len(sampler_threads()) == 1
    time.sleep(0.02)
    assert meter.end() == pytest.approx(5.0 * meter.window_s) and not sampler_threads()


@pytest.mark.serial
def test_idle_window_is_at_least_ten_meter_updates(tmp_path):
    """An idle window shorter than the meter's update period can read no update at all (NVML
    updates every 100 ms, and would give 0 W of idle, subtracted as if measured): the idle
    window is stretched to 10 updates, like the measured one."""
    jetson_old(tmp_path, {"VDD_IN": 5000})
    meter = HwmonMeter(tmp_path, interval_s=0.01)
    assert meter.shortest_window_s() == pytest.approx(10 * meter.update_period_s) == pytest.approx(1.0)
    assert measure_idle_watts(meter, 0.01) == pytest.approx(5.0)
    assert meter.window_s >= 1.0


def test_energy_per_inference_is_millijoules_of_the_window(tmp_path):
    """Units end to end: joules over the window, minus idle watts x the window's seconds, per
    inference, in mJ (a 1 J window of 4 inferences with 0.5 W idle over 1 s: 250 and 125 mJ)."""
    measured = EnergyMeasurement("measured:rapl", inferences=4, window_s=1.0, gross_joules=1.0, idle_watts=0.5,
                                 net_joules=1.0 - 0.5 * 1.0)
    assert measured.gross_mj_per_inference == pytest.approx(250.0)
    assert measured.net_mj_per_inference == pytest.approx(125.0)


# --- the estimate path: catalog entries, user-made devices, and what an estimate says it used


def matmul_graph(path: Path, size: int = 256) -> Path:
    """A real ONNX file: one fp32 MatMul of a [1, size] input by a [size, size] weight."""
    weight = numpy_helper.from_array(np.full((size, size), 0.5, np.float32), "weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "weight"], ["y"], name="/fc/MatMul")], "fc",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def board(**figures) -> Device:
    """A device of round figures (1 TFLOPS, 1 GB/s, 2 W), with any of them replaced."""
    spec = dict(name="test-board", description="a board of round figures", kind="cpu", backends=["onnxruntime"],
                peak={"fp32": 1.0}, memory_bandwidth_gbs=1.0, active_w=2.0, idle_w=0.5, node_overhead_us=10.0,
                efficiency={"compute": 0.5, "memory": 0.5})
    return Device(**(spec | figures))


def test_estimate_units_and_labels_on_a_hand_priced_graph(tmp_path):
    """1 x 256 x 256 MACs at 0.5 x 1 TFLOPS take 0.26 µs; the (256 + 65536 + 256) x 4 bytes at
    0.5 x 1 GB/s take 528.4 µs; plus 10 µs per node. Energy: 2 W x 0.5384 ms = 1.0768 mJ gross,
    (2 - 0.5 W idle) x 0.5384 ms = 0.8076 mJ net; 45 nm: 65536 fp32 MACs x 4.6 pJ."""
    est = estimate(matmul_graph(tmp_path / "fc.onnx"), board())
    assert est.macs == 256 * 256
    assert est.latency_ms == pytest.approx((264_192 / 0.5e9 + 10e-6) * 1e3)
    assert est.energy_mj == pytest.approx(2.0 * est.latency_ms)
    assert est.net_energy_mj == pytest.approx(1.5 * est.latency_ms)  # what stands beside a measured net figure
    assert est.compute_energy_45nm_mj == pytest.approx(65_536 * 4.6e-9)
    assert est.provenance == "estimated:roofline" and est.device == "test-board"
    assert est.energy_provenance.startswith("estimated:roofline (device 'test-board': 2.0 W active")
    assert "gross; net: less 0.5 W idle" in est.energy_provenance
    assert "estimated:roofline" in est.summary() and "test-board" in est.summary()
    assert f"{est.energy_mj:.4f} mJ gross, {est.net_energy_mj:.4f} mJ net" in est.summary()


@pytest.mark.parametrize("figures, named", [
    ({"peak": {"fp32": 0.0}}, "peak fp32 = 0.0"),
    ({"peak": {}}, "lists no precision"),
    ({"peak": {"fp32": float("nan")}}, "peak fp32 = nan"),
    ({"memory_bandwidth_gbs": 0}, "memory_bandwidth_gbs = 0"),
    ({"memory_bandwidth_gbs": float("inf")}, "memory_bandwidth_gbs = inf"),
    ({"active_w": float("nan")}, "active_w = nan"),
    ({"active_w": -15.0}, "active_w = -15.0"),
    ({"idle_w": -1.0}, "idle_w = -1.0"),
    ({"node_overhead_us": float("nan")}, "node_overhead_us = nan"),
    ({"efficiency": {"compute": 0.5}}, "efficiency memory = None"),
    ({"efficiency": {"compute": 1.5, "memory": 0.5}}, "efficiency compute = 1.5"),
    ({"idle_w": 2.0}, "idle_w = 2.0 W is not below active_w = 2.0 W"),
], ids=["zero peak", "no peak", "NaN peak", "zero bandwidth", "infinite bandwidth", "NaN power", "negative power",
        "negative idle", "NaN overhead", "no memory efficiency", "efficiency above 1", "idle as high as active"])
def test_a_device_that_cannot_price_a_model_is_a_user_error(tmp_path, figures, named):
    """These once divided by zero, raised KeyError, or printed NaN or negative latency and energy."""
    with pytest.raises(UserError, match="device 'test-board' cannot price a model") as raised:
        estimate(matmul_graph(tmp_path / "fc.onnx"), board(**figures))
    assert named in str(raised.value)


@pytest.mark.parametrize("name", [None, 3, ["jetson-orin-nano"]], ids=["None", "a number", "a list"])
def test_a_device_name_that_is_no_text_is_a_user_error(name):
    with pytest.raises(UserError, match="a device is named by text"):
        catalog.get(name)


@pytest.mark.parametrize("threads", [0, -2, 1.5, True], ids=["zero", "negative", "fraction", "bool"])
def test_host_at_impossible_thread_counts_is_a_user_error(threads):
    """host(threads=0) once priced the machine at zero peak: a ZeroDivisionError in the estimate."""
    with pytest.raises(UserError, match="threads must be a whole number of logical CPUs"):
        catalog.host(threads=threads)


def test_a_caller_editing_a_device_does_not_change_the_catalog():
    device = catalog.get("jetson-orin-nano")
    peak, source = device.peak["int8"], device.sources["peak"]
    device.peak["int8"] = 0.0
    device.sources["peak"] = "edited"
    again = catalog.get("jetson-orin-nano")
    assert peak > 0 and again.peak["int8"] == peak and again.sources["peak"] == source


ENTRY = """
[test-board]
description = "a board"
kind = "cpu"
backends = ["onnxruntime"]
peak = { fp32 = 1.0 }
memory_bandwidth_gbs = 1.0
active_w = 2.0
idle_w = 0.5
node_overhead_us = 10.0
efficiency = { compute = 0.5, memory = 0.5 }
"""


@pytest.mark.parametrize("text, reason", [
    ("[test-board\n", "cannot read the device catalog"),
    (ENTRY.replace("active_w = 2.0", "active_w = nan"), "active_w = nan W is not a finite positive"),
    (ENTRY.replace("peak = { fp32 = 1.0 }", "peak = { fp32 = inf }"), "peak fp32 = inf TOPS"),
    (ENTRY.replace("memory_bandwidth_gbs = 1.0", "memory_bandwidth_gbs = -102.0"), "memory_bandwidth_gbs = -102.0"),
    (ENTRY.replace("peak = { fp32 = 1.0 }", "peak = {}"), "lists no precision"),
    (ENTRY.replace("idle_w = 0.5", "idle_w = 0.5\nidle_watts = 0.5"), "has unknown fields idle_watts"),
    (ENTRY.replace("active_w = 2.0\n", ""), "lacks active_w"),
    ("test-board = 3\n", "[test-board] is 3, not a table"),
], ids=["not TOML", "NaN power", "infinite peak", "negative bandwidth", "empty peak", "unknown field",
        "missing field", "not a table"])
def test_a_broken_catalog_entry_is_one_line_naming_file_and_entry(tmp_path, text, reason):
    path = write(tmp_path / "catalog.toml", text)
    with pytest.raises(UserError) as raised:
        catalog.load_catalog(path)
    assert str(path) in str(raised.value) and reason in str(raised.value)
    if text.startswith("\n[test-board]"):
        assert "test-board" in str(raised.value)


def test_an_empty_catalog_has_no_devices_and_a_good_one_loads(tmp_path):
    assert catalog.load_catalog(write(tmp_path / "empty.toml", "# nothing yet")) == {}
    entries = catalog.load_catalog(write(tmp_path / "one.toml", ENTRY))
    assert list(entries) == ["test-board"] and entries["test-board"]["active_w"] == 2.0


def test_the_shipped_catalog_loads_and_every_device_can_price_a_model():
    entries = catalog.load_catalog(catalog.CATALOG)
    assert entries and all(catalog.check_device(catalog.get(name)) for name in entries)
