import numpy as np
import pytest
import torch

import edgeport as ep
from edgeport.export.onnx import OnnxRuntimeRunner
from edgeport.verify import StreamingRunner
from edgeport.zoo import WEIGHTS_DIR
from edgeport.zoo.models import LMU


def test_names():
    assert ep.zoo.names() == ["cnn-digits", "cnn-digits-pruned", "lmu-digits", "snn-digits", "vit-digits"]


@pytest.mark.parametrize("name", ["cnn-digits", "cnn-digits-pruned", "lmu-digits", "snn-digits", "vit-digits"])
def test_shipped_model_reaches_its_recorded_accuracy(name):
    record = ep.zoo.info(name)
    images, labels = ep.zoo.testset(name)
    assert images.shape == (360, 1, 8, 8) and labels.shape == (360,)
    with torch.no_grad():
        accuracy = float((ep.zoo.load(name)(images).argmax(1) == labels).float().mean()) * 100
    assert accuracy == pytest.approx(record["test_accuracy_percent"], abs=0.01)
    assert accuracy > 95
    assert (WEIGHTS_DIR / f"{name}.safetensors").stat().st_size < 2_000_000


def test_split_is_the_fixed_stratified_one():
    x_train = ep.zoo.calibration("cnn-digits", 1437)
    assert x_train.shape == (1437, 1, 8, 8)
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    assert ep.zoo.calibration("vit-digits", 32).shape == (32, 1, 8, 8)
    with pytest.raises(ep.UserError):
        ep.zoo.calibration("vit-digits", 0)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ep.UserError, match="did you mean vit-digits"):
        ep.zoo.load("vit-digit")


def test_training_is_reproducible(tmp_path, monkeypatch):
    """Retraining the CNN with the shipped script gives the shipped accuracy."""
    from edgeport.zoo import train

    monkeypatch.setattr(train, "WEIGHTS_DIR", tmp_path)
    record = train.train("cnn-digits")
    assert record["test_accuracy_percent"] == pytest.approx(ep.zoo.info("cnn-digits")["test_accuracy_percent"],
                                                            abs=0.6)
    assert (tmp_path / "cnn-digits.safetensors").exists()


def test_lmu_streams_row_by_row_bit_identical_to_its_unrolled_form(tmp_path):
    """The LMU's step form, driven one row at a time through ONNX Runtime with its memory fed
    back, gives bit for bit the logits of its unrolled form at every step, on all 360 test
    digits, and after the last row classifies them as torch does."""
    model = ep.zoo.load("lmu-digits")
    images, labels = ep.zoo.testset("lmu-digits")
    rows = LMU.rows(images)  # (8 rows, 360, 8 pixels)
    verify = [rows[:, i:i + 1] for i in range(0, 360, 45)]
    common = dict(out=tmp_path, timesteps=8, sequence=True, verify_inputs=verify)
    step = ep.export(model, rows[:, :1], snn_form="step", **common)["onnx"]
    unrolled = ep.export(model, rows[:, :1], snn_form="unrolled", snn_outputs="per_step", **common)["onnx"]
    assert step.parity.passed and unrolled.parity.passed
    assert [s.name for s in step.inputs] == ["x", "memory"] and step.settings["snn"]["state_outputs"] == ["memory_next"]
    stream, whole = StreamingRunner.open(step.path).load(), OnnxRuntimeRunner(unrolled.path).load()
    streamed = []
    for i in range(360):
        stream.reset()
        streamed.append(np.stack([stream.infer({"x": rows[t, i:i + 1].numpy()})["output_0"] for t in range(8)]))
    streamed = np.concatenate(streamed, axis=1)
    unrolled_out = np.concatenate([whole.infer({"x": rows[:, i:i + 1].numpy()})["output_0_per_step"]
                                   for i in range(360)], axis=1)
    assert streamed.shape == (8, 360, 10) and np.array_equal(streamed, unrolled_out)
    with torch.no_grad():
        torch_logits = model(images).numpy()
    assert np.array_equal(streamed[-1].argmax(1), torch_logits.argmax(1))
    assert (streamed[-1].argmax(1) == labels.numpy()).mean() * 100 == pytest.approx(
        ep.zoo.info("lmu-digits")["test_accuracy_percent"], abs=0.01)
