"""Energy meters read real sysfs-shaped trees built here (this machine has no counters)."""
import os
import time
from pathlib import Path

import pytest

from edgeport.runtime.energy import (HwmonMeter, MeterError, MeterUnavailable, RaplMeter, counter_delta,
                                     detect_meter, find_rails, measure_energy)


def write(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")
    return path


def rapl_tree(root: Path, energy_uj: int, max_range: int = 262_143_328_850) -> Path:
    domain = root / "intel-rapl:0"
    write(domain / "name", "package-0")
    write(domain / "max_energy_range_uj", max_range)
    write(domain / "intel-rapl:0:0" / "energy_uj", 5)  # a subdomain (core): not counted twice
    return write(domain / "energy_uj", energy_uj)


def test_counter_delta_handles_wrap_and_rejects_backwards():
    assert counter_delta(100, 250, 1000) == 150
    assert counter_delta(900, 50, 1000) == 150  # wrapped once at 1000
    with pytest.raises(MeterError, match="went backwards"):
        counter_delta(600, 500, 1000)  # 100 down is not a wrap: it would mean 900 up


def test_rapl_joules_across_a_wrap(tmp_path):
    counter = rapl_tree(tmp_path, 999_000_000, max_range=1_000_000_000)
    meter = RaplMeter(tmp_path, interval_s=3600)  # samples only at begin and end, as we drive it
    meter.start()
    for reading in (999_500_000, 200_000_000, 700_000_000):  # wraps between the 1st and 2nd reading
        counter.write_text(f"{reading}\n")
        meter.sample()
    assert meter.total_joules() == pytest.approx((1_000_000_000 - 999_000_000 + 700_000_000) / 1e6)


def test_rapl_window_with_the_sampling_thread(tmp_path):
    counter = rapl_tree(tmp_path, 1_000)
    meter = RaplMeter(tmp_path, interval_s=0.01)
    meter.begin()
    counter.write_text("2501000\n")  # +2.5 J during the window
    time.sleep(0.05)
    assert meter.end() == pytest.approx(2.5)


def test_rapl_backwards_counter_is_an_error(tmp_path):
    counter = rapl_tree(tmp_path, 5_000_000, max_range=1_000_000_000)
    meter = RaplMeter(tmp_path, interval_s=3600)
    meter.start()
    counter.write_text("4000000\n")
    with pytest.raises(MeterError):
        meter.sample()


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


def test_rails_in_millivolts_and_milliamps_integrate_to_joules(tmp_path):
    jetson_mainline(tmp_path, {"VDD_IN": (5000, 1200), "VDD_CPU_GPU_CV": (5000, 400)})
    meter = HwmonMeter(tmp_path, interval_s=0.01)
    assert meter._power() == pytest.approx(6.0)  # 5 V x 1.2 A
    meter.begin()
    time.sleep(0.2)
    start = time.perf_counter()
    joules = meter.end()
    assert joules == pytest.approx(6.0 * 0.2, rel=0.25)
    assert time.perf_counter() - start < 0.1


def test_measure_energy_reports_gross_and_net(tmp_path):
    jetson_mainline(tmp_path, {"VDD_IN": (5000, 1000)})  # a constant 5 W: all of it idle
    meter = HwmonMeter(tmp_path, interval_s=0.01)
    result = measure_energy(meter, lambda: time.sleep(0.001), min_window_s=0.2, idle_s=0.1)
    assert result.provenance == "measured:hwmon" and result.inferences > 10
    assert result.idle_watts == pytest.approx(5.0, rel=0.05)
    assert result.gross_joules == pytest.approx(5.0 * result.window_s, rel=0.1)
    assert abs(result.net_joules) < 0.1 * result.gross_joules


def test_detect_meter_without_counters_says_why(tmp_path):
    meter, reasons = detect_meter(tmp_path / "powercap", tmp_path / "hwmon")
    assert meter is None and any("RAPL" in r for r in reasons) and any("INA3221" in r for r in reasons)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user and make the tree unreadable")
def test_permission_denied_is_reported_not_raised(tmp_path):
    """A root-only counter read by an ordinary user, as RAPL is since CVE-2020-8694."""
    counter = rapl_tree(tmp_path, 1000)
    counter.chmod(0o400)
    for folder in (tmp_path, *tmp_path.parents):
        if folder == Path("/"):
            break
        folder.chmod(folder.stat().st_mode | 0o005)  # let the other user reach the file itself
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to 'nobody' and try the meter
        os.close(read)
        os.setgid(65534)
        os.setuid(65534)
        try:
            RaplMeter(tmp_path)
            message = "no error"
        except MeterUnavailable as error:
            message = str(error)
        except BaseException as error:
            message = f"other: {error!r}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    message = os.read(read, 4096).decode()
    assert "permission denied" in message and "energy_uj" in message
