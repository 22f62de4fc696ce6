"""Profiling, estimates and reports on real artifacts with real ONNX Runtime."""
import json
import os
import signal
from pathlib import Path

import pytest

import edgeport as ep
from edgeport.cli import main
from edgeport.devices import catalog
from edgeport.devices.estimate import estimate, module_path
from edgeport.runtime.report import load_reports, render_html
from test_energy import rapl_tree


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts")
    return {name: ep.export(name, out=out)["onnx"] for name in ("cnn-digits", "vit-digits")}


def test_profile_measures_and_labels_everything(artifacts):
    prof = ep.profile(artifacts["vit-digits"].path, runs=60, warmup=5)
    lat = prof.latency
    assert len(lat.samples_ms) == 60 and lat.p50 <= lat.p90 <= lat.p99
    assert lat.median_ci95[0] <= lat.p50 <= lat.median_ci95[1]
    assert prof.inputs_source == "vit-digits test images"
    assert not prof.energy.available and prof.energy.provenance == "unavailable" and prof.energy.reasons
    assert prof.estimate.device == "host" and prof.estimate.provenance == "estimated:roofline"
    shares = prof.ops.by_category()
    assert abs(sum(shares.values()) - 1) < 1e-6 and {"attention", "matmul/gemm", "normalization"} <= set(shares)
    assert any(op.module.startswith("blocks.0.attn") for op in prof.ops.ops)
    data = prof.to_dict()
    assert data["schema"] == "edgeport.profile/1" and data["units"]["latency"] == "ms"
    assert data["environment"]["onnxruntime"] and data["environment"]["cpu"]


def test_profile_with_a_meter_reports_measured_energy(artifacts, tmp_path):
    rapl_tree(tmp_path, 1000)  # a counter that does not move: 0 J, but read and labelled as RAPL
    prof = ep.profile(artifacts["cnn-digits"].path, runs=20, ops=False, energy_window_s=0.1, idle_s=0.05,
                      rapl_root=tmp_path)
    assert prof.energy.available and prof.energy.provenance == "measured:rapl"
    assert prof.energy.gross_mj_per_inference == 0 and prof.energy.idle_subtracted


def test_profile_survives_a_broken_meter(artifacts, tmp_path, monkeypatch):
    """The counter file runs backwards as soon as the window opens (a faulty driver)."""
    import edgeport.runtime.energy as energy

    counter = rapl_tree(tmp_path, 10_000_000, max_range=1_000_000_000)
    first_reading = energy.RaplMeter.start

    def start_then_rewind(meter):
        first_reading(meter)
        counter.write_text("9000000\n")

    monkeypatch.setattr(energy.RaplMeter, "start", start_then_rewind)
    prof = ep.profile(artifacts["cnn-digits"].path, runs=20, ops=False, energy_window_s=0.1, idle_s=0,
                      rapl_root=tmp_path)
    assert not prof.energy.available and "went backwards" in prof.energy.reasons[0]
    assert len(prof.latency.samples_ms) == 20


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_permission_denied_meter_still_gives_a_profile(artifacts, tmp_path):
    counter = rapl_tree(tmp_path, 1000)
    counter.chmod(0o400)
    for folder in (tmp_path, *tmp_path.parents, artifacts["cnn-digits"].path.parent):
        if folder != Path("/"):
            folder.chmod(folder.stat().st_mode | 0o005)
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        signal.alarm(120)
        os.setgid(65534)
        os.setuid(65534)
        try:
            prof = ep.profile(artifacts["cnn-digits"].path, runs=10, ops=False, rapl_root=tmp_path)
            message = json.dumps({"available": prof.energy.available, "reasons": prof.energy.reasons,
                                  "runs": len(prof.latency.samples_ms)})
        except BaseException as error:
            message = json.dumps({"error": repr(error)})
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    result = json.loads(os.read(read, 65536).decode())
    assert result.get("runs") == 10 and not result["available"]
    assert "permission denied" in result["reasons"][0]


def test_profile_bad_input(artifacts, tmp_path):
    with pytest.raises(ep.UserError, match="runs must be positive"):
        ep.profile(artifacts["cnn-digits"].path, runs=0)
    with pytest.raises(ep.UserError, match="runs must be positive"):
        ep.profile(artifacts["cnn-digits"].path, runs=-3)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ep.UserError, match="cannot read .*broken.onnx as ONNX"):
        ep.profile(broken)
    with pytest.raises(ep.UserError, match="did you mean jetson-orin-nano"):
        ep.profile(artifacts["cnn-digits"].path, device="jetson-orin-nan")


def test_unknown_device_suggests_closest():
    with pytest.raises(ep.UserError, match="did you mean raspberry-pi-5"):
        catalog.get("raspberry-pi5")


def test_every_catalog_number_has_a_source():
    for name in catalog.names():
        device = catalog.get(name)
        for key in ("peak", "memory_bandwidth_gbs", "active_w"):
            assert device.sources.get(key), f"{name}: {key} has no source"
        assert device.peak and device.memory_bandwidth_gbs > 0


def test_estimates_count_macs_and_scale_across_devices(artifacts):
    cnn = estimate(artifacts["cnn-digits"].path, "raspberry-pi-5")
    # conv MACs: 8x8x(1x32x9 + 32x32x9) + 4x4x(32x64x9 + 64x64x9), plus the 64x10 classifier
    assert cnn.macs == 8 * 8 * (32 * 9 + 32 * 32 * 9) + 4 * 4 * (32 * 64 * 9 + 64 * 64 * 9) + 640
    orin, pi = estimate(artifacts["vit-digits"].path, "jetson-agx-orin"), estimate(artifacts["vit-digits"].path,
                                                                                  "raspberry-pi-5")
    assert pi.latency_ms > orin.latency_ms > 0
    assert pi.energy_mj == pytest.approx(6.0 * pi.latency_ms)  # the Pi's active power x latency
    assert "estimated" in pi.energy_provenance


def test_spike_rates_turn_macs_into_accumulates(artifacts):
    path = artifacts["cnn-digits"].path
    dense = estimate(path, "host")
    conv_inputs = {n.input[0] for n in __import__("onnx").load(str(path)).graph.node if n.op_type == "Conv"}
    sparse = estimate(path, "host", firing_rates={name: 0.1 for name in conv_inputs})
    assert sparse.synaptic_ops > 0 and sparse.compute_energy_45nm_mj < dense.compute_energy_45nm_mj


def test_module_path_from_both_exporters():
    import onnx

    node = onnx.helper.make_node("MatMul", ["a", "b"], ["c"], name="/blocks/blocks.0/attn/qkv/MatMul")
    assert module_path(node) == "blocks.0.attn.qkv"


def test_cli_profile_estimate_devices_report(artifacts, tmp_path, capsys):
    path = str(artifacts["cnn-digits"].path)
    assert main(["profile", path, "--runs", "30", "-o", str(tmp_path / "cnn.profile.json"), "--no-energy"]) == 0
    assert "p50" in capsys.readouterr().out  # results on stdout
    assert main(["estimate", path, "--device", "all", "--json"]) == 0
    estimates = json.loads(capsys.readouterr().out)
    assert [e["device"] for e in estimates] == catalog.names()
    (tmp_path / "estimates.json").write_text(json.dumps(estimates))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") >= 3 and "estimated" in page
    profiles, loaded = load_reports(tmp_path)
    assert len(profiles) == 1 and len(loaded) == len(catalog.names())
    assert main(["devices", "--json"]) == 0
    assert main(["estimate", path, "--device", "jetson-nano"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert main(["profile", path, "--runs", "0"]) == 2
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_accuracy_plot_renders():
    page = render_html([], [], accuracy=[{"model": "vit", "variant": "w8a8", "bits": 8, "accuracy_percent": 97.0},
                                         {"model": "vit", "variant": "w4a4", "bits": 4, "accuracy_percent": 90.0}])
    assert "accuracy vs bit width" in page and "<polyline" in page


def test_torch_backend_profile_with_op_breakdown(capsys):
    prof = ep.profile("cnn-digits", backend="torch", runs=30, warmup=3, energy=False)
    assert prof.backend == "torch" and prof.inputs_source == "cnn-digits test images"
    assert len(prof.latency.samples_ms) == 30 and prof.estimate is None
    assert prof.ops.backend == "torch" and "conv" in prof.ops.by_category()
    with pytest.raises(ep.UserError, match="needs inputs"):
        ep.profile(__import__("torch").nn.Linear(3, 3), backend="torch")
    assert main(["profile", "vit-digits", "--backend", "torch", "--runs", "20", "--no-energy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "torch"


def test_cuda_backend_is_unavailable_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu_check.py covers the CUDA runner")
    with pytest.raises(ep.BackendUnavailable, match="no CUDA device"):
        ep.profile("cnn-digits", backend="torch-cuda", runs=5)
