"""The fused optimizer steps: one launch per (device, dtype) group updates params and state and applies the prox.

:func:`sgd_step_` and :func:`adamw_step_` have the contract of :mod:`regfast.reference.optim`.
Each work item of the launcher's list reads its chunk of params, grads and state once, does the
optimizer update and the elastic-net prox in the accumulation dtype, writes params and state
once and, with ``compute_penalty``, the partial ``l1·Σ|w| + l2·Σw²`` of the new (rounded)
params, summed afterwards in a fixed order. Group lasso needs every group's norm after the
update, so the group shrink is a second pass: the group launches of :func:`regfast.triton.prox_`
after the fused one (float16 / bfloat16 params stepped in float32 copies and rounded once, as the
reference does), and in Adam's metric (``prox="preconditioned"``) the reference step, whose
per-group Newton iterations run as torch ops.

The arithmetic follows the reference op for op, in the same dtypes and with correctly rounded
division and square root, so float32 results agree with ``torch.optim`` up to rounding order:

- ``lr`` is a float or a 0-dim tensor that the kernel loads itself (no host sync, capturable);
- AdamW's bias corrections are computed where the reference computes them: on the host in
  float64 when the step counts are on the CPU and ``lr`` is a float (a small table is copied
  to the device without blocking), else in the kernel in float32 from the float32 step
  counts, which it reads through a pointer table when they live on the params' device
  (``capturable``). The counts are incremented before the launch, as the reference does.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from .._common import HOST, READ_LISTS, Lr, acc_dtype, lr_step
from .functors import div_rn, elastic_net, load, prox_step, round_to, scalar, sqrt_rn, store
from .launcher import (
    LAUNCH_OPTIONS,
    acc_tl_dtype,
    block_size,
    capturing,
    contiguous,
    layout,
    on_device,
    pointer_table,
    pointer_tables,
    tensor_pointer,
    tl_dtype,
    work_item,
    write_back,
)
from .penalty import penalty as _penalty
from .prox import prox_step_


@triton.jit
def _lerp(start, end, weight):
    """start + weight·(end − start) with torch.lerp's two formulas, exact at weight 0 and 1."""
    small = tl.abs(weight) < 0.5
    return tl.where(small, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _power(base, count):
    """``base^count`` in float64 for a whole ``count`` in [0, 2^24] (a float32 step count), by binary
    exponentiation: within a few float64 ulps, so that its float32 rounding is the correctly rounded
    power, with no transcendental function (whose float64 lowering differs between backends)."""
    n = count.to(tl.int32)
    base = scalar(base, tl.float64)
    result = tl.full((), 1.0, tl.float64)
    for _ in tl.static_range(25):
        result = tl.where((n & 1) != 0, result * base, result)
        base = base * base
        n = n >> 1
    return result


@triton.jit
def _finish_block(w, w_ptr, offs, mask, abs_sum, sq_sum, DTYPE: tl.constexpr, ACC: tl.constexpr,
                  HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, PENALTY: tl.constexpr, MASKED: tl.constexpr):
    """Round the new params into ``DTYPE``, store them and add the rounded values to the penalty sums."""
    rounded = round_to(w, DTYPE)
    store(w_ptr + offs, rounded, mask, MASKED)
    if PENALTY:
        value = rounded.to(ACC)
        if MASKED:
            value = tl.where(mask, value, 0.0)
        if HAS_L1:
            abs_sum += tl.abs(value)
        if HAS_L2:
            sq_sum += value * value
    return abs_sum, sq_sum


@triton.jit
def _sgd_block(w_ptr, g_ptr, buf_ptr, offs, count, abs_sum, sq_sum, step, threshold, shrink, momentum: tl.float64,
               buffer_grad_scale: tl.float64, weight_decay: tl.float64, DTYPE: tl.constexpr, ACC: tl.constexpr,
               MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
               INIT_BUFFERS: tl.constexpr, NESTEROV: tl.constexpr, HAS_L1: tl.constexpr, HAS_L2: tl.constexpr,
               PENALTY: tl.constexpr, MASKED: tl.constexpr):
    mask = offs < count
    w = load(w_ptr + offs, mask, MASKED).to(ACC)
    g = load(g_ptr + offs, mask, MASKED).to(ACC)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + scalar(weight_decay, ACC) * w
    if HAS_MOMENTUM:
        if INIT_BUFFERS:
            buf = g
        else:
            buf = load(buf_ptr + offs, mask, MASKED)
            buf = buf * scalar(momentum, ACC) + scalar(buffer_grad_scale, ACC) * g
        store(buf_ptr + offs, buf, mask, MASKED)
        if NESTEROV:
            g = g + scalar(momentum, ACC) * buf
        else:
            g = buf
    w = w + (-step) * g
    w = elastic_net(w, threshold, shrink, HAS_L1, HAS_L2)
    return _finish_block(w, w_ptr, offs, mask, abs_sum, sq_sum, DTYPE, ACC, HAS_L1, HAS_L2, PENALTY, MASKED)


@triton.jit(do_not_specialize=["n_work"])
def _sgd_kernel(param_ptrs, grads, buffers, sizes, work, partials, n_work, lr_ptr, lr_value: tl.float64,
                momentum: tl.float64, buffer_grad_scale: tl.float64, weight_decay: tl.float64,
                l1: tl.float64, l2: tl.float64,
                DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                LR_TENSOR: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, INIT_BUFFERS: tl.constexpr, NESTEROV: tl.constexpr,
                HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, PENALTY: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, start, count = work_item(work, sizes, n_work, CHUNK)
    w_ptr = tensor_pointer(param_ptrs, t, DTYPE, ALIGNED) + start
    g_ptr = tensor_pointer(grads, t, DTYPE, ALIGNED) + start
    buf_ptr = w_ptr.to(tl.pointer_type(ACC), bitcast=True)
    if HAS_MOMENTUM:
        buf_ptr = tensor_pointer(buffers, t, ACC, ALIGNED) + start
    step, threshold, shrink = prox_step(lr_ptr, lr_value, l1, l2, ACC, LR_TENSOR)
    abs_sum = tl.zeros([BLOCK], dtype=ACC)
    sq_sum = tl.zeros([BLOCK], dtype=ACC)
    full = count - count % BLOCK
    for j in range(0, full, BLOCK):
        offs = tl.multiple_of(j, BLOCK) + tl.arange(0, BLOCK)
        abs_sum, sq_sum = _sgd_block(w_ptr, g_ptr, buf_ptr, offs, count, abs_sum, sq_sum, step, threshold, shrink,
                                     momentum, buffer_grad_scale, weight_decay, DTYPE, ACC, MAXIMIZE,
                                     HAS_WEIGHT_DECAY, HAS_MOMENTUM, INIT_BUFFERS, NESTEROV, HAS_L1, HAS_L2, PENALTY,
                                     False)
    if full < count:
        abs_sum, sq_sum = _sgd_block(w_ptr, g_ptr, buf_ptr, full + tl.arange(0, BLOCK), count, abs_sum, sq_sum, step,
                                     threshold, shrink, momentum, buffer_grad_scale, weight_decay, DTYPE, ACC,
                                     MAXIMIZE, HAS_WEIGHT_DECAY, HAS_MOMENTUM, INIT_BUFFERS, NESTEROV, HAS_L1, HAS_L2,
                                     PENALTY, True)
    if PENALTY:
        tl.store(partials + pid, scalar(l1, ACC) * tl.sum(abs_sum, axis=0) + scalar(l2, ACC) * tl.sum(sq_sum, axis=0))


@triton.jit
def _adamw_block(w_ptr, g_ptr, m_ptr, v_ptr, v_max_ptr, offs, count, abs_sum, sq_sum, lr, threshold, shrink, decay,
                 step_size, bc2, avg_w, beta2: tl.float64, sq_weight: tl.float64, eps: tl.float64, l1: tl.float64,
                 l2: tl.float64, DTYPE: tl.constexpr, ACC: tl.constexpr, LR_TENSOR: tl.constexpr,
                 MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, AMSGRAD: tl.constexpr,
                 DEVICE_BIAS: tl.constexpr, PRECONDITIONED: tl.constexpr, HAS_L1: tl.constexpr,
                 HAS_L2: tl.constexpr, PENALTY: tl.constexpr, MASKED: tl.constexpr):
    mask = offs < count
    w = load(w_ptr + offs, mask, MASKED).to(ACC)
    g = load(g_ptr + offs, mask, MASKED).to(ACC)
    if MAXIMIZE:
        g = -g
    m = _lerp(load(m_ptr + offs, mask, MASKED), g, avg_w)
    v = load(v_ptr + offs, mask, MASKED) * scalar(beta2, ACC) + scalar(sq_weight, ACC) * g * g
    store(m_ptr + offs, m, mask, MASKED)
    store(v_ptr + offs, v, mask, MASKED)
    if AMSGRAD:
        v = tl.maximum(load(v_max_ptr + offs, mask, MASKED), v, propagate_nan=tl.PropagateNan.ALL)
        store(v_max_ptr + offs, v, mask, MASKED)
    denom = div_rn(sqrt_rn(v, ACC), bc2, ACC) + scalar(eps, ACC)
    if PRECONDITIONED:
        # Adam's denominator is at least the penalty's gradient at w (before the weight decay), for the update
        # and the prox alike (reference.penalty_gradient_scales); a NaN denominator stays NaN. The floor is formed
        # here rather than at the load: w is live until its update anyway, the floor then only briefly (formed at
        # the load, it spilled registers in the 16-bit variants with every option on sm_80).
        floor = scalar(l1, ACC)
        if HAS_L2:
            floor = (2.0 * scalar(l2, ACC)) * tl.abs(w) + floor
        denom = tl.where(denom < floor, floor, denom)
    if HAS_WEIGHT_DECAY:
        w = w * decay
    if DEVICE_BIAS:
        w = w + div_rn(m, div_rn(denom, step_size, ACC), ACC)
    else:
        w = w + div_rn(step_size * m, denom, ACC)
    if PRECONDITIONED:
        # Per-element step lr/d, formed as the reference forms it (a float lr multiplies 1/d).
        if LR_TENSOR:
            s = div_rn(lr, denom, ACC)
        else:
            s = div_rn(scalar(1.0, ACC), denom, ACC) * lr
        w = elastic_net(w, s * scalar(l1, ACC), div_rn(scalar(1.0, ACC), 1.0 + s * (2.0 * scalar(l2, ACC)), ACC),
                        HAS_L1, HAS_L2)
    else:
        w = elastic_net(w, threshold, shrink, HAS_L1, HAS_L2)
    return _finish_block(w, w_ptr, offs, mask, abs_sum, sq_sum, DTYPE, ACC, HAS_L1, HAS_L2, PENALTY, MASKED)


@triton.jit(do_not_specialize=["n_work", "n"])
def _adamw_kernel(param_ptrs, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, sizes, work, partials, n_work, n,
                  lr_ptr, lr_value: tl.float64, bias_table, step_counts, beta1_f32: tl.float64,
                  beta2_f32: tl.float64, avg_weight: tl.float64, beta2: tl.float64, sq_weight: tl.float64,
                  eps: tl.float64, decay_value: tl.float64, weight_decay: tl.float64, l1: tl.float64,
                  l2: tl.float64,
                  DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                  LR_TENSOR: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                  AMSGRAD: tl.constexpr, DEVICE_BIAS: tl.constexpr, STEP_POINTERS: tl.constexpr,
                  PRECONDITIONED: tl.constexpr, HAS_L1: tl.constexpr, HAS_L2: tl.constexpr,
                  PENALTY: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, start, count = work_item(work, sizes, n_work, CHUNK)
    w_ptr = tensor_pointer(param_ptrs, t, DTYPE, ALIGNED) + start
    g_ptr = tensor_pointer(grads, t, DTYPE, ALIGNED) + start
    m_ptr = tensor_pointer(exp_avgs, t, ACC, ALIGNED) + start
    v_ptr = tensor_pointer(exp_avg_sqs, t, ACC, ALIGNED) + start
    v_max_ptr = v_ptr
    if AMSGRAD:
        v_max_ptr = tensor_pointer(max_exp_avg_sqs, t, ACC, ALIGNED) + start
    lr, threshold, shrink = prox_step(lr_ptr, lr_value, l1, l2, ACC, LR_TENSOR)
    decay = scalar(1.0, ACC)
    if HAS_WEIGHT_DECAY:
        if LR_TENSOR:
            decay = 1.0 - lr * scalar(weight_decay, ACC)
        else:
            decay = scalar(decay_value, ACC)
    if DEVICE_BIAS:
        # The reference's float32 tensor math: step_size = −lr/(1 − β1ᵗ), bc2 = √(1 − β2ᵗ), with β
        # rounded to float32 and βᵗ rounded to float32.
        if STEP_POINTERS:
            count_t = tl.load(tensor_pointer(step_counts, t, tl.float32))
        else:
            count_t = tl.load(step_counts + t)
        bc1 = _power(beta1_f32, count_t).to(tl.float32) - 1.0
        if LR_TENSOR:
            bias_lr = lr
        else:
            bias_lr = lr.to(tl.float32).to(ACC)
        bc1 = div_rn(bc1.to(ACC), bias_lr, ACC).to(tl.float32)
        step_size = div_rn(scalar(1.0, tl.float32), bc1, tl.float32).to(ACC)
        bc2 = sqrt_rn(1.0 - _power(beta2_f32, count_t).to(tl.float32), tl.float32).to(ACC)
    else:
        step_size = tl.load(bias_table + t)
        bc2 = tl.load(bias_table + n + t)
    avg_w = scalar(avg_weight, ACC)
    abs_sum = tl.zeros([BLOCK], dtype=ACC)
    sq_sum = tl.zeros([BLOCK], dtype=ACC)
    full = count - count % BLOCK
    for j in range(0, full, BLOCK):
        offs = tl.multiple_of(j, BLOCK) + tl.arange(0, BLOCK)
        abs_sum, sq_sum = _adamw_block(w_ptr, g_ptr, m_ptr, v_ptr, v_max_ptr, offs, count, abs_sum, sq_sum, lr,
                                       threshold, shrink, decay, step_size, bc2, avg_w, beta2, sq_weight, eps, l1, l2,
                                       DTYPE, ACC, LR_TENSOR, MAXIMIZE, HAS_WEIGHT_DECAY, AMSGRAD, DEVICE_BIAS,
                                       PRECONDITIONED, HAS_L1, HAS_L2, PENALTY, False)
    if full < count:
        abs_sum, sq_sum = _adamw_block(w_ptr, g_ptr, m_ptr, v_ptr, v_max_ptr, full + tl.arange(0, BLOCK), count,
                                       abs_sum, sq_sum, lr, threshold, shrink, decay, step_size, bc2, avg_w, beta2,
                                       sq_weight, eps, l1, l2, DTYPE, ACC, LR_TENSOR, MAXIMIZE, HAS_WEIGHT_DECAY,
                                       AMSGRAD, DEVICE_BIAS, PRECONDITIONED, HAS_L1, HAS_L2, PENALTY, True)
    if PENALTY:
        tl.store(partials + pid, scalar(l1, ACC) * tl.sum(abs_sum, axis=0) + scalar(l2, ACC) * tl.sum(sq_sum, axis=0))


def _to_device(values: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device``, copied from pinned memory so that the host does not wait."""
    if device.type == "cuda":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)


@functools.lru_cache(maxsize=64)
def _float32(value: float) -> float:
    """``value`` rounded to float32, as torch rounds a float scalar applied to float32 tensors (a step's betas: the
    same few values at every step, so they are kept)."""
    return float(torch.tensor(value, dtype=torch.float32))


def _consecutive(steps: list[Tensor]) -> Tensor | None:
    """The one-dim float32 CPU tensor whose consecutive elements the 0-dim or one-element ``steps`` are, or None."""
    if type(steps) in READ_LISTS:
        return steps.flat
    base = steps[0]._base
    if base is None or base.device.type != "cpu" or base.dtype != torch.float32 or base.dim() != 1 or \
            base.stride(0) != 1:
        return None
    first = steps[0].storage_offset()
    for i, s in enumerate(steps):
        if s._base is not base or s.storage_offset() != first + i or s.numel() != 1:
            return None
    start = first - base.storage_offset()  # an index into base
    return base[start:start + len(steps)] if 0 <= start and start + len(steps) <= base.numel() else None


def _count_host_steps(steps: list[Tensor], lr: float, beta1: float, beta2: float, acc: torch.dtype,
                      device: torch.device) -> Tensor:
    """Increments the CPU step counts (with one add where they are consecutive elements of one tensor, as
    optimizers' plans keep them), then ``[−lr/(1 − β1ᵗ)]ₙ ++ [√(1 − β2ᵗ)]ₙ`` of the new counts in ``acc`` on
    ``device``, computed in float64 exactly as the reference computes them (once per distinct count): by the
    extension in one call where they are consecutive."""
    flat = _consecutive(steps)
    if flat is not None and HOST.bias_table is not None:
        table = HOST.bias_table(flat, lr, beta1, beta2, acc == torch.float64)
        if table is not None:
            return _to_device(table, device)
    if flat is not None:
        flat.add_(1)
        low, high = torch.aminmax(flat)
        if low.item() == high.item():  # every param stepped as often: one count, no per-param Python
            distinct, inverse = [low.item()], None
        else:
            found, inverse = torch.unique(flat, return_inverse=True)
            distinct = found.tolist()
    else:
        torch._foreach_add_(steps, 1)
        counts = [s.item() for s in steps]
        distinct = sorted(set(counts))
        position = {t: i for i, t in enumerate(distinct)}
        inverse = torch.tensor([position[t] for t in counts], dtype=torch.int64)
    table = torch.tensor([[(lr / (1 - beta1**t)) * -1 for t in distinct], [(1 - beta2**t) ** 0.5 for t in distinct]],
                         dtype=acc)
    values = table.expand(2, len(steps)) if inverse is None else table[:, inverse]
    return _to_device(values.reshape(-1), device)


def _step_then_group_shrink(params: list[Tensor], grads: list[Tensor], fused, lr: Lr, l1: float, l2: float,
                            group_lasso: float, groups: str, compute_penalty: bool) -> Tensor:
    """``fused(params, grads)`` (the step with the elementwise prox), then the group shrink with the scalar step
    ``lr``: ``u_g ← max(0, 1 − lr·group_lasso·√|g|/((1 + 2·lr·l2)·‖u_g‖₂))·u_g``, i.e. the group launches of
    :func:`prox_step_` with step ``lr/(1 + 2·lr·l2)``. Float16 / bfloat16 params are stepped in float32 copies
    and rounded once. Returns the penalty of the new params, or a 0-dim zero."""
    acc = acc_dtype(params[0].dtype)
    copies = params[0].dtype != acc
    work = [p.to(acc) for p in params] if copies else params
    fused(work, [g.to(acc) for g in grads] if copies else grads)
    prox_step_(work, lr / (1 + 2 * lr * l2) if l2 else lr, 0.0, 0.0, group_lasso, groups)
    if copies:
        torch._foreach_copy_(params, work)
    if compute_penalty:
        return _penalty(params, l1, l2, group_lasso, groups)
    return params[0].new_zeros((), dtype=acc)


def sgd_step_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], lr_tensor: Tensor | None,
              lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float, maximize: bool,
              init_buffers: bool, l1: float, l2: float, group_lasso: float, groups: str,
              compute_penalty: bool) -> Tensor:
    """One ``torch.optim.SGD`` step followed by the proximal step, in place: one launch, and the group
    launches with group lasso. Same contract as :func:`regfast.reference.sgd_step_`."""
    step = lr_step(params, lr_tensor, lr)
    args = (momentum, dampening, nesterov, weight_decay, maximize, init_buffers, l1, l2)
    if not group_lasso:
        return _sgd_fused(params, grads, momentum_buffers, step, *args, compute_penalty)
    return _step_then_group_shrink(params, grads, lambda ps, gs: _sgd_fused(ps, gs, momentum_buffers, step, *args,
                                                                            False),
                                   step, l1, l2, group_lasso, groups, compute_penalty)


def _sgd_fused(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], lr: Lr, momentum: float,
               dampening: float, nesterov: bool, weight_decay: float, maximize: bool, init_buffers: bool, l1: float,
               l2: float, compute_penalty: bool) -> Tensor:
    """The SGD step with the elastic-net prox in one launch. Non-contiguous params and buffers are updated in
    contiguous copies that are then copied back."""
    dtype = params[0].dtype
    acc = acc_dtype(dtype)
    device = params[0].device
    work_params = contiguous(params)
    # Kept alive until the launch: the kernel reads the copies through their addresses.
    work_grads = contiguous(grads)
    work_buffers = contiguous(momentum_buffers) if momentum != 0 else []
    lay = layout(work_params)
    (table, grad_table, buffer_table), aligned = pointer_tables(work_params, work_grads, work_buffers)
    buffer_table = table if buffer_table is None else buffer_table
    penalty = compute_penalty and bool(l1 or l2)
    partials = torch.zeros(lay.n_work if penalty else 0, dtype=acc, device=device)
    lr_tensor = isinstance(lr, Tensor)
    # Pointer arguments a launch does not read (their constexpr flag is off) get any tensor.
    unused = table
    if lay.n_work:
        with on_device(device):
            _sgd_kernel[(lay.n_work,)](
                table, grad_table, buffer_table, lay.sizes, lay.work, partials, lay.n_work,
                lr if lr_tensor else unused, 0.0 if lr_tensor else float(lr), float(momentum), 1.0 - dampening,
                float(weight_decay), float(l1), float(l2), DTYPE=tl_dtype(dtype), ACC=acc_tl_dtype(dtype),
                CHUNK=lay.chunk, BLOCK=block_size(dtype), LR_TENSOR=lr_tensor, MAXIMIZE=bool(maximize),
                HAS_WEIGHT_DECAY=weight_decay != 0, HAS_MOMENTUM=momentum != 0, INIT_BUFFERS=bool(init_buffers),
                NESTEROV=bool(nesterov), HAS_L1=bool(l1), HAS_L2=bool(l2), PENALTY=penalty, ALIGNED=aligned,
                **LAUNCH_OPTIONS)
    write_back(params, work_params)
    write_back(momentum_buffers if momentum != 0 else [], work_buffers)
    return partials.sum()


def adamw_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr_tensor: Tensor | None, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                l1: float, l2: float, group_lasso: float, groups: str, prox: str, compute_penalty: bool) -> Tensor:
    """One ``torch.optim.AdamW`` step followed by the proximal step, in place: one launch, and the group
    launches with group lasso (the reference step in Adam's metric). Same contract as
    :func:`regfast.reference.adamw_step_`."""
    if group_lasso and prox == "preconditioned":
        return reference.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, lr,
                                     beta1, beta2, eps, weight_decay, amsgrad, maximize, l1, l2, group_lasso, groups,
                                     prox, compute_penalty)
    step = lr_step(params, lr_tensor, lr)
    state = (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    args = (beta1, beta2, eps, weight_decay, amsgrad, maximize, l1, l2, prox)
    if not group_lasso:
        return _adamw_fused(params, grads, *state, step, *args, compute_penalty)
    return _step_then_group_shrink(params, grads, lambda ps, gs: _adamw_fused(ps, gs, *state, step, *args, False),
                                   step, l1, l2, group_lasso, groups, compute_penalty)


def _adamw_fused(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr: Lr, beta1: float, beta2: float, eps: float,
                 weight_decay: float, amsgrad: bool, maximize: bool, l1: float, l2: float, prox: str,
                 compute_penalty: bool) -> Tensor:
    """The AdamW step with the elastic-net prox in one launch. The step counts are incremented first (on their
    own device); non-contiguous params and state tensors are updated in contiguous copies that are then copied
    back."""
    dtype = params[0].dtype
    acc = acc_dtype(dtype)
    device = params[0].device
    device_bias = isinstance(lr, Tensor) or not steps[0].is_cpu
    step_pointers = device_bias and all(s.device == device and s.dtype == torch.float32 for s in steps)
    if capturing(device) and not step_pointers:
        raise RuntimeError("regfast: this AdamW step reads its step counts on the host, so a CUDA graph would replay "
                           "the bias corrections of the captured step: keep the step counts as float32 tensors on "
                           "the params' device (capturable=True) to capture it")
    if device_bias:
        torch._foreach_add_(steps, 1)
    work_params = contiguous(params)
    # Kept alive until the launch: the kernel reads the copies through their addresses.
    work_grads = contiguous(grads)
    work_avgs = contiguous(exp_avgs)
    work_sqs = contiguous(exp_avg_sqs)
    work_maxs = contiguous(max_exp_avg_sqs) if amsgrad else []
    lay = layout(work_params)
    (table, grad_table, avg_table, sq_table, max_table), aligned = pointer_tables(
        work_params, work_grads, work_avgs, work_sqs, work_maxs)
    penalty = compute_penalty and bool(l1 or l2)
    partials = torch.zeros(lay.n_work if penalty else 0, dtype=acc, device=device)
    lr_tensor = isinstance(lr, Tensor)
    # Pointer arguments a launch does not read (their constexpr flag is off) get any tensor.
    unused = table
    if not device_bias:
        bias_table, step_counts = _count_host_steps(steps, float(lr), beta1, beta2, acc, device), unused
    elif step_pointers:
        bias_table, step_counts = unused, pointer_table(steps)[0]
    else:
        bias_table = unused
        step_counts = _to_device(torch.stack([s.detach().to("cpu", torch.float32) for s in steps]), device)
    if lay.n_work:
        with on_device(device):
            _adamw_kernel[(lay.n_work,)](
                table, grad_table, avg_table, sq_table, max_table if amsgrad else unused, lay.sizes,
                lay.work, partials, lay.n_work, lay.n, lr if lr_tensor else unused, 0.0 if lr_tensor else float(lr),
                bias_table, step_counts, _float32(beta1), _float32(beta2), 1.0 - beta1, float(beta2), 1.0 - beta2,
                float(eps), 0.0 if lr_tensor else 1.0 - float(lr) * weight_decay, float(weight_decay), float(l1),
                float(l2), DTYPE=tl_dtype(dtype), ACC=acc_tl_dtype(dtype), CHUNK=lay.chunk, BLOCK=block_size(dtype),
                LR_TENSOR=lr_tensor, MAXIMIZE=bool(maximize), HAS_WEIGHT_DECAY=weight_decay != 0,
                AMSGRAD=bool(amsgrad), DEVICE_BIAS=device_bias, STEP_POINTERS=step_pointers,
                PRECONDITIONED=prox == "preconditioned", HAS_L1=bool(l1), HAS_L2=bool(l2), PENALTY=penalty,
                ALIGNED=aligned, **LAUNCH_OPTIONS)
    write_back(params, work_params)
    write_back(exp_avgs, work_avgs)
    write_back(exp_avg_sqs, work_sqs)
    write_back(max_exp_avg_sqs if amsgrad else [], work_maxs)
    return partials.sum()
