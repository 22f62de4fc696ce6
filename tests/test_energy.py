"""Energy meters read real sysfs-shaped trees built here (this machine has no counters)."""
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgeport.errors import EdgeportError
from edgeport.runtime.energy import (HOST_PEAK_WATTS, HwmonMeter, MeterError, NvmlMeter, RaplMeter,
                                     counter_delta, detect_meter, find_rails, measure_energy)

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
