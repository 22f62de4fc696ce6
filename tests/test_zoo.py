import pytest
import torch

import edgeport as ep
from edgeport.zoo import WEIGHTS_DIR


def test_names():
    assert ep.zoo.names() == ["cnn-digits", "cnn-digits-pruned", "snn-digits", "vit-digits"]


@pytest.mark.parametrize("name", ["cnn-digits", "cnn-digits-pruned", "snn-digits", "vit-digits"])
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
