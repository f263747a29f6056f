"""Parameter shapes of real models, generated (no downloads).

Each workload is a function returning ``[(name, shape), ...]`` in ``named_parameters()`` order:

- ``gpt2-small``: GPT-2 small, 124,439,808 params in 148 tensors (tied head);
- ``llama-1b``: a Llama-style decoder (d 2048, 16 layers, SwiGLU ff 5632, vocab 32000, RMSNorm,
  no biases, untied head), 953,223,168 params in 147 tensors;
- ``resnet50``: torchvision's ResNet-50, 25,557,032 params in 161 tensors (BatchNorm weights and biases);
- ``many-small``: 2,000 tensors of 1,024 elements, where launches, not bytes, set the time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["WORKLOADS", "gpt2_small", "llama_1b", "make_params", "many_small", "numel", "resnet50", "scaled"]

Shapes = list[tuple[str, tuple[int, ...]]]


def gpt2_small() -> Shapes:
    """GPT-2 small (124M params, 148 tensors) as in Hugging Face's ``GPT2LMHeadModel`` (tied head)."""
    d, ff, layers = 768, 3072, 12
    shapes = [("wte.weight", (50257, d)), ("wpe.weight", (1024, d))]
    for i in range(layers):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (d, 3 * d)), (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)), (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (d, ff)), (p + "mlp.c_fc.bias", (ff,)),
            (p + "mlp.c_proj.weight", (ff, d)), (p + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def llama_1b(d: int = 2048, layers: int = 16, ff: int = 5632, vocab: int = 32000) -> Shapes:
    """A Llama-style decoder as in Hugging Face's ``LlamaForCausalLM`` (full multi-head attention).

    ``nn.Linear`` weights are (out, in); each layer has q/k/v/o (d, d), SwiGLU gate/up (ff, d)
    and down (d, ff), and two RMSNorm weights (d,). With the defaults: 953,223,168 params, 147 tensors.
    """
    shapes = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{name}.weight", (d, d)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        shapes += [(p + "mlp.gate_proj.weight", (ff, d)), (p + "mlp.up_proj.weight", (ff, d)),
                   (p + "mlp.down_proj.weight", (d, ff)),
                   (p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
    shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    return shapes


def resnet50() -> Shapes:
    """torchvision's ``resnet50()``: bottleneck blocks [3, 4, 6, 3], 25,557,032 params in 161 tensors.

    Each block is conv1 1x1, conv2 3x3, conv3 1x1 (4x expansion), each followed by a BatchNorm
    (weight and bias); the first block of each stage adds a 1x1 downsample conv and its BatchNorm.
    Convs have no bias; the fc layer has one.
    """
    shapes: Shapes = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}."
            shapes += [(p + "conv1.weight", (planes, inplanes, 1, 1)),
                       (p + "bn1.weight", (planes,)), (p + "bn1.bias", (planes,)),
                       (p + "conv2.weight", (planes, planes, 3, 3)),
                       (p + "bn2.weight", (planes,)), (p + "bn2.bias", (planes,)),
                       (p + "conv3.weight", (4 * planes, planes, 1, 1)),
                       (p + "bn3.weight", (4 * planes,)), (p + "bn3.bias", (4 * planes,))]
            if b == 0:
                shapes += [(p + "downsample.0.weight", (4 * planes, inplanes, 1, 1)),
                           (p + "downsample.1.weight", (4 * planes,)), (p + "downsample.1.bias", (4 * planes,))]
            inplanes = 4 * planes
    shapes += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return shapes


def many_small(count: int = 2000, size: int = 1024) -> Shapes:
    """``count`` 1-D tensors of ``size`` elements: the time is set by per-tensor overheads."""
    return [(f"t{i}", (size,)) for i in range(count)]


WORKLOADS: dict[str, Callable[[], Shapes]] = {
    "gpt2-small": gpt2_small,
    "llama-1b": llama_1b,
    "resnet50": resnet50,
    "many-small": many_small,
}


def numel(shapes: Shapes) -> int:
    """Total number of elements of ``shapes``."""
    return sum(math.prod(shape) for _, shape in shapes)


def scaled(shapes: Shapes, scale: float) -> Shapes:
    """``shapes`` with every dim 0 shrunk by ``scale`` (at least 1); 0-dim shapes are kept."""
    if scale == 1.0:
        return list(shapes)
    return [(name, (max(1, int(shape[0] * scale)), *shape[1:]) if shape else shape) for name, shape in shapes]


def make_params(shapes: Shapes, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", scale: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    """Random leaf tensors (``std = 0.02``, like GPT-2's init) of the given shapes, requiring grad.

    ``scale`` < 1 shrinks every dim 0 proportionally (at least 1), for quick runs.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _, shape in scaled(shapes, scale):
        t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
        out.append(t.to(device=device, dtype=dtype).requires_grad_())
    return out
