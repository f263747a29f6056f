"""Pure-PyTorch fused optimizer steps: the spec, the CPU path and the test oracle of the optimizer ops.

Each function serves one (device, dtype) group, like :mod:`regfast.reference.penalty`: ``params``
is a non-empty list of tensors sharing a device and a floating dtype, ``grads`` matches it tensor by
tensor, and every state tensor (momentum buffers, Adam moments) has the params' shapes in the
accumulation dtype (float32, float64 for float64 params). The step is ``lr_tensor`` (0-dim, taken to
the params' device in the accumulation dtype) when given, else the float ``lr``. The update mirrors the ``foreach``
implementation of ``torch.optim.SGD`` / ``torch.optim.AdamW`` op for op, so that with no
penalty the two agree to the last bit on float32 params; float16 / bfloat16 params are read
into float32, updated and proximally shrunk there, and rounded once per step.

Each step ends with the proximal step of ``l1·Σ|w| + l2·Σw² + group_lasso·Σ_g √|g|·‖w_g‖₂``
and returns the penalty of the new (rounded) params as a 0-dim accumulation-dtype tensor when
``compute_penalty`` is set, else a 0-dim zero. ``grads`` are never written.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._common import Lr, acc_dtype, group_dims, group_size, lr_step
from .penalty import group_norms, penalty, prox_step_

# Newton steps of the group shrink in a diagonal metric. The iterates rise monotonically to the
# root and converge quadratically; with thresholds spread over 14 orders of magnitude, 6 steps
# reach float64 rounding, so 8 leave a margin.
METRIC_NEWTON_STEPS = 8


def _working_copies(params: list[Tensor], grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Params and grads in the accumulation dtype: the tensors themselves when already there, else copies."""
    acc = acc_dtype(params[0].dtype)
    if params[0].dtype == acc:
        return params, list(grads)
    return [p.to(acc) for p in params], [g.to(acc) for g in grads]


def _finish(params: list[Tensor], work: list[Tensor], compute_penalty: bool, l1: float, l2: float,
            group_lasso: float, groups: str) -> Tensor:
    """Round the updated copies back into ``params`` and return the penalty (or a zero)."""
    if work is not params:
        torch._foreach_copy_(params, work)
    if compute_penalty:
        return penalty(params, l1, l2, group_lasso, groups)
    return params[0].new_zeros((), dtype=acc_dtype(params[0].dtype))


def sgd_step_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], lr_tensor: Tensor | None,
              lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float, maximize: bool,
              init_buffers: bool, l1: float, l2: float, group_lasso: float, groups: str,
              compute_penalty: bool) -> Tensor:
    """One ``torch.optim.SGD`` step followed by the proximal step with step ``lr``, in place.

    ``momentum_buffers`` is empty when ``momentum == 0``; with ``init_buffers`` their contents
    are ignored and they are set to the (decayed) gradient, as SGD does on a param's first step.
    Mutates ``params`` and ``momentum_buffers``.
    """
    lr = lr_step(params, lr_tensor, lr)
    work, g = _working_copies(params, grads)
    if maximize:
        g = torch._foreach_neg(g)
    if weight_decay != 0:
        g = torch._foreach_add(g, work, alpha=weight_decay)
    if momentum != 0:
        if init_buffers:
            torch._foreach_copy_(momentum_buffers, g)
        else:
            torch._foreach_mul_(momentum_buffers, momentum)
            torch._foreach_add_(momentum_buffers, g, alpha=1 - dampening)
        g = torch._foreach_add(g, momentum_buffers, alpha=momentum) if nesterov else momentum_buffers
    if isinstance(lr, Tensor) and not lr.is_cpu:
        torch._foreach_add_(work, torch._foreach_mul(g, -lr))  # no host sync
    else:
        # torch's SGD in eager mode: alpha = −lr, a CPU tensor lr read as a number.
        torch._foreach_add_(work, g, alpha=-lr)
    if l1 or l2 or group_lasso:
        prox_step_(work, lr, l1, l2, group_lasso, groups)
    return _finish(params, work, compute_penalty, l1, l2, group_lasso, groups)


def _bias_corrections(steps: list[Tensor], lr: Lr, beta1: float, beta2: float, device: torch.device,
                      ) -> tuple[list[float] | list[Tensor], list[float] | list[Tensor]]:
    """Per-tensor ``−lr/(1 − β1ᵗ)`` and ``√(1 − β2ᵗ)``: floats for CPU step counts and a float lr,
    tensors on ``device`` otherwise (no host sync), each computed as torch's Adam computes it."""
    if steps[0].is_cpu and not isinstance(lr, Tensor):
        counts = [s.item() for s in steps]
        return [(lr / (1 - beta1**t)) * -1 for t in counts], [(1 - beta2**t) ** 0.5 for t in counts]
    steps = [s.to(device) for s in steps]
    bc1 = torch._foreach_pow(beta1, steps)
    bc2 = torch._foreach_pow(beta2, steps)
    torch._foreach_sub_(bc1, 1)
    torch._foreach_sub_(bc2, 1)
    torch._foreach_neg_(bc2)
    torch._foreach_div_(bc1, lr)
    torch._foreach_reciprocal_(bc1)
    torch._foreach_sqrt_(bc2)
    return bc1, bc2


def adamw_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr_tensor: Tensor | None, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                l1: float, l2: float, group_lasso: float, groups: str, prox: str, compute_penalty: bool) -> Tensor:
    """One ``torch.optim.AdamW`` step followed by the proximal step, in place.

    ``steps`` holds one float32 0-dim step count per param (on the CPU, or on the params'
    device for capturable use) and is incremented first. ``max_exp_avg_sqs`` is empty unless
    ``amsgrad``. ``prox="lr"`` shrinks with the scalar step ``lr``; ``prox="preconditioned"``
    with the per-element step ``lr/d`` where ``d = √v̂ + eps`` is Adam's denominator (see
    :func:`metric_prox_`). Mutates ``params``, ``exp_avgs``, ``exp_avg_sqs``,
    ``max_exp_avg_sqs`` and ``steps``.
    """
    lr = lr_step(params, lr_tensor, lr)
    work, g = _working_copies(params, grads)
    if maximize:
        g = torch._foreach_neg(g)
    torch._foreach_add_(steps, 1)
    metric = prox == "preconditioned" and bool(l1 or l2 or group_lasso)
    floors = penalty_gradient_scales(work, l1, l2, group_lasso, groups) if metric else None
    if weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, 1 - beta2)
    del g
    second = exp_avg_sqs
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        second = max_exp_avg_sqs
    step_size, bc2_sqrt = _bias_corrections(steps, lr, beta1, beta2, params[0].device)
    denom = torch._foreach_sqrt(second)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    if floors is not None:
        torch._foreach_maximum_(denom, floors)
        del floors
    if isinstance(step_size[0], Tensor):
        torch._foreach_addcdiv_(work, exp_avgs, torch._foreach_div(denom, step_size))
    else:
        torch._foreach_addcdiv_(work, exp_avgs, denom, step_size)
    if l1 or l2 or group_lasso:
        if prox == "lr":
            prox_step_(work, lr, l1, l2, group_lasso, groups)
        else:
            for w, d in zip(work, denom):
                metric_prox_(w, lr / d, l1, l2, group_lasso, groups)
    return _finish(params, work, compute_penalty, l1, l2, group_lasso, groups)


def penalty_gradient_scales(params: list[Tensor], l1: float, l2: float, group_lasso: float, groups: str,
                            ) -> list[Tensor]:
    """Per element, the size of the penalty's gradient at ``params``: ``l1 + 2·l2·|w| + group_lasso·√|g|·|w|/‖w_g‖``
    (the group term 0 for a zero group; an absent term is not added), in the params' dtype.

    ``prox="preconditioned"`` uses ``max(√v̂ + eps, this)`` as Adam's denominator, for the update and the
    prox alike: an element whose gradients are smaller than the penalty's, or that never had one
    (``v̂ = 0``), gets the step Adam would give it if the penalty's gradient were its gradient (the
    penalty then moves it by at most about ``lr`` per step), instead of ``lr/eps``. With one metric for
    both, the fixed points are still the minimizers of loss + penalty.
    """
    out = []
    for w in params:
        scale = torch.zeros_like(w) if not l2 else w.abs().mul_(2 * l2)
        if l1:
            scale.add_(l1)
        if group_lasso and w.numel():
            norm = group_norms(w, groups)
            size = math.sqrt(group_size(w, groups))
            scale.add_((w.abs().to(torch.float64) / torch.where(norm == 0, 1, norm) * (group_lasso * size)).to(w.dtype))
        out.append(scale)
    return out


def metric_prox_(w: Tensor, step: Tensor, l1: float, l2: float, group_lasso: float, groups: str) -> None:
    """The proximal step of the penalty in the diagonal metric of per-element steps ``step``, in place.

    ``w ← argmin_x Σ_i (x_i − w_i)²/(2·s_i) + l1·|x_i| + l2·x_i² + group_lasso·Σ_g √|g|·‖x_g‖₂``
    with ``s = step`` (same shape as ``w``, positive, accumulation dtype). It is the exact
    proximal operator, so a preconditioned proximal gradient method built on it has the
    minimizers of loss + penalty as its fixed points, and it equals :func:`regfast.reference.prox_`
    when all ``s_i`` are equal. Elementwise: ``u = sign(w)·max(|w| − s·l1, 0)/(1 + 2·s·l2)``.
    Per group, with thresholds ``a_i = group_lasso·√|g|·s_i/(1 + 2·s_i·l2)``: the group
    becomes 0 when ``‖u_g/a_g‖₂ ≤ 1``, else ``x_i = u_i·t/(t + a_i)`` where ``t = ‖x_g‖₂ > 0``
    solves ``Σ_i u_i²/(t + a_i)² = 1``, found by Newton's method on ``1/r(t) − 1``
    (``r(t)² = Σ u_i²/(t + a_i)²``, a concave increasing function) from
    ``t₀ = max(‖u_g‖ − max a_g, 0)``, which lies left of the root, so the iterates increase
    monotonically to it; with equal ``a_i`` the first step lands on ``‖u_g‖ − a``.
    """
    if l1:
        threshold = step * l1
        w.sub_(torch.clamp(w, -threshold, threshold))
    if l2:
        shrink = 1 / (1 + 2 * l2 * step)
        w.mul_(shrink)
        step = step * shrink
    if group_lasso:
        _metric_group_shrink_(w, step * (group_lasso * math.sqrt(group_size(w, groups))), groups)


def _metric_group_shrink_(u: Tensor, a: Tensor, groups: str) -> None:
    """``u_g ← argmin_x Σ_i (x_i − u_i)²/(2·a_i) + ‖x_g‖₂`` for every group, in place (see :func:`metric_prox_`)."""
    dims = group_dims(u, groups)
    if u.numel() == 0:
        return

    def group_sum(x: Tensor) -> Tensor:
        return x.sum() if dims is None else x.sum(dim=dims, keepdim=True)

    def group_max(x: Tensor) -> Tensor:
        return x.amax() if dims is None else x.amax(dim=dims, keepdim=True)

    # The test and Newton's steps in float64, where ‖u_g‖² of float32 / 16-bit weights neither overflows nor
    # underflows; t is then rounded to u's dtype, where the factor is formed.
    u64, a64 = u.to(torch.float64), a.to(torch.float64)
    nonzero = u64 != 0
    vanishes = group_sum(torch.where(nonzero, u64 / a64, 0).square()) <= 1
    tiny = torch.finfo(u.dtype).tiny
    t = torch.clamp_min(group_sum(u64.square()).sqrt() - group_max(a64), 0)
    for _ in range(METRIC_NEWTON_STEPS):
        x = (t + a64).clamp_min(tiny)
        q2 = torch.where(nonzero, u64 / x, 0).square()
        r2 = group_sum(q2)
        slope = group_sum(q2 / x).clamp_min(tiny)
        t = t + (r2.sqrt() - 1) * r2 / slope
    t = t.to(u.dtype)
    factor = t / (t + a).clamp_min(tiny)
    u.mul_(torch.where(vanishes, 0, factor))
