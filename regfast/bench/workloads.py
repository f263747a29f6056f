"""Parameter shapes of real models, generated (no downloads)."""

from __future__ import annotations

import torch


def gpt2_small() -> list[tuple[str, tuple[int, ...]]]:
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


WORKLOADS = {"gpt2-small": gpt2_small}


def make_params(shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", scale: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    """Random leaf tensors (``std = 0.02``, like GPT-2's init) of the given shapes, requiring grad.

    ``scale`` < 1 shrinks every dim 0 proportionally (at least 1), for quick runs.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _, shape in shapes:
        if scale != 1.0 and shape:
            shape = (max(1, int(shape[0] * scale)), *shape[1:])
        t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
        out.append(t.to(device=device, dtype=dtype).requires_grad_())
    return out
