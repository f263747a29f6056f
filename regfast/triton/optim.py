"""The fused optimizer steps: one launch per (device, dtype) group updates params and state and applies the prox.

:func:`sgd_step_` and :func:`adamw_step_` have the contract of :mod:`regfast.optim._reference`.
Each work item of the launcher's list reads its chunk of params, grads and state once, does the
optimizer update and the elastic-net prox in the accumulation dtype, writes params and state
once and, with ``compute_penalty``, the partial ``l1·Σ|w| + l2·Σw²`` of the new (rounded)
params, summed afterwards in a fixed order. Group lasso is not done here (``group_lasso`` must
be 0): it needs every group's norm after the update, and :mod:`regfast.optim._ops` runs the
group launches of :func:`regfast.triton.prox_` after the fused one, or the reference step.

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

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import Lr, acc_dtype
from .functors import elastic_net, prox_step, round_to, scalar
from .launcher import acc_tl_dtype, addresses, contiguous, layout, tensor_pointer, tl_dtype, write_back


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """a / b rounded to nearest, as torch divides (Triton's plain float32 division is approximate)."""
    if ACC == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """√x rounded to nearest (Triton's plain float32 square root is approximate)."""
    if ACC == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


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
def _finish_element(w, w_ptr, offs, mask, abs_sum, sq_sum, DTYPE: tl.constexpr, ACC: tl.constexpr,
                    HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, PENALTY: tl.constexpr):
    """Round the new params into ``DTYPE``, store them and add the rounded values to the penalty sums."""
    rounded = round_to(w, DTYPE)
    tl.store(w_ptr + offs, rounded, mask=mask)
    if PENALTY:
        value = tl.where(mask, rounded.to(ACC), 0.0)
        if HAS_L1:
            abs_sum += tl.abs(value)
        if HAS_L2:
            sq_sum += value * value
    return abs_sum, sq_sum


@triton.jit
def _sgd_kernel(params, grads, buffers, sizes, work, partials, n_work, lr_ptr, lr_value: tl.float64,
                momentum: tl.float64, buffer_grad_scale: tl.float64, weight_decay: tl.float64,
                l1: tl.float64, l2: tl.float64,
                DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                LR_TENSOR: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, INIT_BUFFERS: tl.constexpr, NESTEROV: tl.constexpr,
                HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, PENALTY: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(work + pid)
    start = tl.load(work + n_work + pid) * CHUNK
    w_ptr = tensor_pointer(params, t, DTYPE)
    g_ptr = tensor_pointer(grads, t, DTYPE)
    if HAS_MOMENTUM:
        buf_ptr = tensor_pointer(buffers, t, ACC)
    step, threshold, shrink = prox_step(lr_ptr, lr_value, l1, l2, ACC, LR_TENSOR)
    abs_sum = tl.zeros([BLOCK], dtype=ACC)
    sq_sum = tl.zeros([BLOCK], dtype=ACC)
    end = tl.minimum(tl.load(sizes + t) - start, CHUNK)
    for j in range(0, end, BLOCK):
        local = j + tl.arange(0, BLOCK)
        offs = start + local
        mask = local < end
        w = tl.load(w_ptr + offs, mask=mask, other=0).to(ACC)
        g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
        if MAXIMIZE:
            g = -g
        if HAS_WEIGHT_DECAY:
            g = g + scalar(weight_decay, ACC) * w
        if HAS_MOMENTUM:
            if INIT_BUFFERS:
                buf = g
            else:
                buf = tl.load(buf_ptr + offs, mask=mask, other=0)
                buf = buf * scalar(momentum, ACC) + scalar(buffer_grad_scale, ACC) * g
            tl.store(buf_ptr + offs, buf, mask=mask)
            if NESTEROV:
                g = g + scalar(momentum, ACC) * buf
            else:
                g = buf
        w = w + (-step) * g
        w = elastic_net(w, threshold, shrink, HAS_L1, HAS_L2)
        abs_sum, sq_sum = _finish_element(w, w_ptr, offs, mask, abs_sum, sq_sum, DTYPE, ACC, HAS_L1, HAS_L2,
                                          PENALTY)
    if PENALTY:
        tl.store(partials + pid, scalar(l1, ACC) * tl.sum(abs_sum, axis=0) + scalar(l2, ACC) * tl.sum(sq_sum, axis=0))


@triton.jit
def _adamw_kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, sizes, work, partials, n_work, n,
                  lr_ptr, lr_value: tl.float64, bias_table, step_counts, beta1_f32: tl.float64,
                  beta2_f32: tl.float64, avg_weight: tl.float64, beta2: tl.float64, sq_weight: tl.float64,
                  eps: tl.float64, decay_value: tl.float64, weight_decay: tl.float64, l1: tl.float64,
                  l2: tl.float64,
                  DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                  LR_TENSOR: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                  AMSGRAD: tl.constexpr, DEVICE_BIAS: tl.constexpr, STEP_POINTERS: tl.constexpr,
                  PRECONDITIONED: tl.constexpr, HAS_L1: tl.constexpr, HAS_L2: tl.constexpr,
                  PENALTY: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(work + pid)
    start = tl.load(work + n_work + pid) * CHUNK
    w_ptr = tensor_pointer(params, t, DTYPE)
    g_ptr = tensor_pointer(grads, t, DTYPE)
    m_ptr = tensor_pointer(exp_avgs, t, ACC)
    v_ptr = tensor_pointer(exp_avg_sqs, t, ACC)
    if AMSGRAD:
        v_max_ptr = tensor_pointer(max_exp_avg_sqs, t, ACC)
    lr, threshold, shrink = prox_step(lr_ptr, lr_value, l1, l2, ACC, LR_TENSOR)
    if HAS_WEIGHT_DECAY:
        if LR_TENSOR:
            decay = 1.0 - lr * scalar(weight_decay, ACC)
        else:
            decay = scalar(decay_value, ACC)
    if DEVICE_BIAS:
        # The reference's float32 tensor math: step_size = −lr/(1 − β1ᵗ), bc2 = √(1 − β2ᵗ), with β
        # rounded to float32 and βᵗ rounded to float32.
        if STEP_POINTERS:
            count = tl.load(tensor_pointer(step_counts, t, tl.float32))
        else:
            count = tl.load(step_counts + t)
        bc1 = _power(beta1_f32, count).to(tl.float32) - 1.0
        if LR_TENSOR:
            bias_lr = lr
        else:
            bias_lr = lr.to(tl.float32).to(ACC)
        bc1 = _div(bc1.to(ACC), bias_lr, ACC).to(tl.float32)
        step_size = _div(1.0, bc1, tl.float32).to(ACC)
        bc2 = _sqrt(1.0 - _power(beta2_f32, count).to(tl.float32), tl.float32).to(ACC)
    else:
        step_size = tl.load(bias_table + t)
        bc2 = tl.load(bias_table + n + t)
    avg_w = scalar(avg_weight, ACC)
    abs_sum = tl.zeros([BLOCK], dtype=ACC)
    sq_sum = tl.zeros([BLOCK], dtype=ACC)
    end = tl.minimum(tl.load(sizes + t) - start, CHUNK)
    for j in range(0, end, BLOCK):
        local = j + tl.arange(0, BLOCK)
        offs = start + local
        mask = local < end
        w = tl.load(w_ptr + offs, mask=mask, other=0).to(ACC)
        g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
        if MAXIMIZE:
            g = -g
        if HAS_WEIGHT_DECAY:
            w = w * decay
        m = _lerp(tl.load(m_ptr + offs, mask=mask, other=0), g, avg_w)
        v = tl.load(v_ptr + offs, mask=mask, other=0) * scalar(beta2, ACC) + scalar(sq_weight, ACC) * g * g
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if AMSGRAD:
            v = tl.maximum(tl.load(v_max_ptr + offs, mask=mask, other=0), v, propagate_nan=tl.PropagateNan.ALL)
            tl.store(v_max_ptr + offs, v, mask=mask)
        denom = _div(_sqrt(v, ACC), bc2, ACC) + scalar(eps, ACC)
        if DEVICE_BIAS:
            w = w + _div(m, _div(denom, step_size, ACC), ACC)
        else:
            w = w + _div(step_size * m, denom, ACC)
        if PRECONDITIONED:
            # Per-element step lr/d, formed as the reference forms it (a float lr multiplies 1/d).
            if LR_TENSOR:
                s = _div(lr, denom, ACC)
            else:
                s = _div(1.0, denom, ACC) * lr
            w = elastic_net(w, s * scalar(l1, ACC), _div(1.0, 1.0 + s * (2.0 * scalar(l2, ACC)), ACC),
                            HAS_L1, HAS_L2)
        else:
            w = elastic_net(w, threshold, shrink, HAS_L1, HAS_L2)
        abs_sum, sq_sum = _finish_element(w, w_ptr, offs, mask, abs_sum, sq_sum, DTYPE, ACC, HAS_L1, HAS_L2,
                                          PENALTY)
    if PENALTY:
        tl.store(partials + pid, scalar(l1, ACC) * tl.sum(abs_sum, axis=0) + scalar(l2, ACC) * tl.sum(sq_sum, axis=0))


def _to_device(values: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device``, copied from pinned memory so that the host does not wait."""
    if device.type == "cuda":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)


def _float32(value: float) -> float:
    """``value`` rounded to float32, as torch rounds a float scalar applied to float32 tensors."""
    return float(torch.tensor(value, dtype=torch.float32))


def _host_bias_table(steps: list[Tensor], lr: float, beta1: float, beta2: float, acc: torch.dtype,
                     device: torch.device) -> Tensor:
    """``[−lr/(1 − β1ᵗ)]ₙ ++ [√(1 − β2ᵗ)]ₙ`` in ``acc`` on ``device``, from CPU step counts, computed in
    float64 exactly as the reference computes them (once per distinct count)."""
    counts = [s.item() for s in steps]
    corrections = {t: ((lr / (1 - beta1**t)) * -1, (1 - beta2**t) ** 0.5) for t in set(counts)}
    values = [corrections[t][0] for t in counts] + [corrections[t][1] for t in counts]
    return _to_device(torch.tensor(values, dtype=acc), device)


def sgd_step_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], lr: Lr,
              momentum: float, dampening: float, nesterov: bool, weight_decay: float, maximize: bool,
              init_buffers: bool, l1: float, l2: float, group_lasso: float, groups: str,
              compute_penalty: bool) -> Tensor:
    """One ``torch.optim.SGD`` step followed by the proximal step with step ``lr``, in place, in one launch.

    Same contract as :func:`regfast.optim._reference.sgd_step_`. Non-contiguous params and
    buffers are updated in contiguous copies that are then copied back.
    """
    if group_lasso:
        raise ValueError("the fused step takes no group lasso: regfast.optim's op layer runs the group passes")
    dtype = params[0].dtype
    acc = acc_dtype(dtype)
    device = params[0].device
    work_params = contiguous(params)
    # Kept alive until the launch: the kernel reads the copies through their addresses.
    work_grads = contiguous(grads)
    work_buffers = contiguous(momentum_buffers) if momentum != 0 else []
    lay = layout(work_params)
    table = addresses(work_params)
    penalty = compute_penalty and bool(l1 or l2)
    partials = torch.zeros(lay.n_work if penalty else 0, dtype=acc, device=device)
    lr_tensor = isinstance(lr, Tensor)
    # Pointer arguments a launch does not read (their constexpr flag is off) get any tensor.
    unused = table
    if lay.n_work:
        _sgd_kernel[(lay.n_work,)](
            table, addresses(work_grads), addresses(work_buffers) if work_buffers else unused, lay.sizes,
            lay.work, partials, lay.n_work, lr if lr_tensor else unused, 0.0 if lr_tensor else float(lr),
            float(momentum), 1.0 - dampening, float(weight_decay), float(l1), float(l2),
            DTYPE=tl_dtype(dtype), ACC=acc_tl_dtype(dtype), CHUNK=lay.chunk, BLOCK=lay.block, LR_TENSOR=lr_tensor,
            MAXIMIZE=bool(maximize), HAS_WEIGHT_DECAY=weight_decay != 0, HAS_MOMENTUM=momentum != 0,
            INIT_BUFFERS=bool(init_buffers), NESTEROV=bool(nesterov), HAS_L1=bool(l1), HAS_L2=bool(l2),
            PENALTY=penalty)
    write_back(params, work_params)
    write_back(momentum_buffers if momentum != 0 else [], work_buffers)
    return partials.sum()


def adamw_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr: Lr, beta1: float, beta2: float,
                eps: float, weight_decay: float, amsgrad: bool, maximize: bool, l1: float, l2: float,
                group_lasso: float, groups: str, prox: str, compute_penalty: bool) -> Tensor:
    """One ``torch.optim.AdamW`` step followed by the proximal step, in place, in one launch.

    Same contract as :func:`regfast.optim._reference.adamw_step_`. The step counts are
    incremented first (on their own device); non-contiguous params and state tensors are
    updated in contiguous copies that are then copied back.
    """
    if group_lasso:
        raise ValueError("the fused step takes no group lasso: regfast.optim's op layer runs the group passes")
    dtype = params[0].dtype
    acc = acc_dtype(dtype)
    device = params[0].device
    torch._foreach_add_(steps, 1)
    work_params = contiguous(params)
    # Kept alive until the launch: the kernel reads the copies through their addresses.
    work_grads = contiguous(grads)
    work_avgs = contiguous(exp_avgs)
    work_sqs = contiguous(exp_avg_sqs)
    work_maxs = contiguous(max_exp_avg_sqs) if amsgrad else []
    lay = layout(work_params)
    table = addresses(work_params)
    penalty = compute_penalty and bool(l1 or l2)
    partials = torch.zeros(lay.n_work if penalty else 0, dtype=acc, device=device)
    lr_tensor = isinstance(lr, Tensor)
    # Pointer arguments a launch does not read (their constexpr flag is off) get any tensor.
    unused = table
    device_bias = lr_tensor or not steps[0].is_cpu
    step_pointers = device_bias and all(s.device == device and s.dtype == torch.float32 for s in steps)
    if not device_bias:
        bias_table, step_counts = _host_bias_table(steps, float(lr), beta1, beta2, acc, device), unused
    elif step_pointers:
        bias_table, step_counts = unused, addresses(steps)
    else:
        bias_table = unused
        step_counts = _to_device(torch.stack([s.detach().to("cpu", torch.float32) for s in steps]), device)
    if lay.n_work:
        _adamw_kernel[(lay.n_work,)](
            table, addresses(work_grads), addresses(work_avgs), addresses(work_sqs),
            addresses(work_maxs) if amsgrad else unused, lay.sizes, lay.work, partials, lay.n_work, lay.n,
            lr if lr_tensor else unused, 0.0 if lr_tensor else float(lr), bias_table, step_counts,
            _float32(beta1), _float32(beta2),
            1.0 - beta1, float(beta2), 1.0 - beta2, float(eps), 0.0 if lr_tensor else 1.0 - float(lr) * weight_decay,
            float(weight_decay), float(l1), float(l2),
            DTYPE=tl_dtype(dtype), ACC=acc_tl_dtype(dtype), CHUNK=lay.chunk, BLOCK=lay.block, LR_TENSOR=lr_tensor,
            MAXIMIZE=bool(maximize), HAS_WEIGHT_DECAY=weight_decay != 0, AMSGRAD=bool(amsgrad),
            DEVICE_BIAS=device_bias, STEP_POINTERS=step_pointers, PRECONDITIONED=prox == "preconditioned",
            HAS_L1=bool(l1), HAS_L2=bool(l2), PENALTY=penalty)
    write_back(params, work_params)
    write_back(exp_avgs, work_avgs)
    write_back(exp_avg_sqs, work_sqs)
    write_back(max_exp_avg_sqs if amsgrad else [], work_maxs)
    return partials.sum()
