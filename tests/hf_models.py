"""Common `transformers` architectures built from small configs with random weights.

Users bring models like these; the export tests and the backend benchmark use this set.
Each entry builds (model, example inputs) deterministically on the CPU, offline.
"""
from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)
GPT2 = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
VISION = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=64)


class SentenceEncoder(torch.nn.Module):
    """Sentence embeddings as sentence-transformers computes them from a BERT: the token states
    mean-pooled over the attention mask (nothing of a padded position reaches the output), L2
    normalized."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _text_inputs(vocab: int = 128, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.int64)
    mask[1, -4:] = 0  # a padded second sentence exercises the attention mask path
    return ids, mask


def _image(size: int = 32) -> tuple[torch.Tensor]:
    return (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _build(config_name: str, model_name: str, **config):
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
    return model.eval()


ARCHITECTURES = {
    "bert": lambda: (_build("BertConfig", "BertModel", **TEXT), _text_inputs()),
    "roberta": lambda: (_build("RobertaConfig", "RobertaModel", **TEXT, pad_token_id=1), _text_inputs()),
    "distilbert": lambda: (_build("DistilBertConfig", "DistilBertModel", vocab_size=128, dim=32, n_layers=2,
                                  n_heads=2, hidden_dim=64, max_position_embeddings=64), _text_inputs()),
    "albert": lambda: (_build("AlbertConfig", "AlbertModel", **TEXT, embedding_size=16), _text_inputs()),
    "electra": lambda: (_build("ElectraConfig", "ElectraModel", **TEXT, embedding_size=16), _text_inputs()),
    "deberta-v2": lambda: (_build("DebertaV2Config", "DebertaV2Model", **TEXT), _text_inputs()),
    "mpnet": lambda: (_build("MPNetConfig", "MPNetModel", **TEXT), _text_inputs()),
    "xlm-roberta": lambda: (_build("XLMRobertaConfig", "XLMRobertaModel", **TEXT, pad_token_id=1), _text_inputs()),
    "mobilebert": lambda: (_build("MobileBertConfig", "MobileBertModel", vocab_size=128, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                                  max_position_embeddings=64), _text_inputs()),
    "gpt2": lambda: (_build("GPT2Config", "GPT2Model", **GPT2, use_cache=False), _text_inputs()[:1]),
    "vit": lambda: (_build("ViTConfig", "ViTModel", **VISION), _image()),
    "deit": lambda: (_build("DeiTConfig", "DeiTModel", **VISION), _image()),
    "beit": lambda: (_build("BeitConfig", "BeitModel", **VISION), _image()),
    "swin": lambda: (_build("SwinConfig", "SwinModel", image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                            num_heads=[2, 2], window_size=4), _image()),
    "convnext": lambda: (_build("ConvNextConfig", "ConvNextModel", hidden_sizes=[16, 32], depths=[1, 1],
                                num_stages=2), _image()),
    "resnet": lambda: (_build("ResNetConfig", "ResNetModel", embedding_size=16, hidden_sizes=[16, 32],
                              depths=[1, 1]), _image()),
    "mobilevit": lambda: (_build("MobileViTConfig", "MobileViTModel", image_size=64, hidden_sizes=[16, 24, 32],
                                 neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], initializer_range=0.5), _image(64)),
}


# the keyword-input tests' size: hidden 32, 2 layers, vocabulary 100
SMALL_TEXT = dict(TEXT, vocab_size=100)


def small_gpt2() -> torch.nn.Module:
    """GPT-2 (hidden 32, 2 layers, vocabulary 100) without its cache, as it exports to ONNX;
    a `package.module:factory` the CLI can load."""
    return _build("GPT2Config", "GPT2Model", **dict(GPT2, vocab_size=100), use_cache=False)


def small_bert() -> torch.nn.Module:
    """BERT (hidden 32, 2 layers, vocabulary 100); a `package.module:factory` the CLI can load."""
    return _build("BertConfig", "BertModel", **SMALL_TEXT)


class KeywordOnlyEncoder(torch.nn.Module):
    """A BERT behind a forward whose inputs are keyword-only, as wrappers in users' code often
    take them: no input can be passed by position."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
