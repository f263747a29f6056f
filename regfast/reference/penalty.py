"""The penalty ops in pure PyTorch: the spec, the CPU path and the test oracle.

Each function serves one (device, dtype) group: ``params`` is a non-empty list of tensors
that share a device and a floating dtype. Values are returned in :func:`acc_dtype` (float32, or
float64 for float64 tensors); sums are taken in float64 in an order that depends neither on the
thread count nor on the device (:func:`_fixed_order_sums`), and group norms never overflow or
underflow for finite weights (:func:`group_norms`). The math, for coefficients ``l1``, ``l2``,
``group_lasso`` (``gl``) and groups ``g`` of size ``|g|``:

    penalty  = l1·Σ|w| + l2·Σw² + gl·Σ_g √|g|·‖w_g‖₂
    gradient = l1·sign(w) + 2·l2·w + gl·√|g|·w_g/‖w_g‖₂      (the last term is 0 where w_g = 0)
    prox_    : u = sign(w)·max(|w| − s·l1, 0) / (1 + 2·s·l2)
               w_g ← max(0, 1 − s·gl·√|g| / ((1 + 2·s·l2)·‖u_g‖₂))·u_g

The prox is the exact proximal operator of the whole penalty with step ``s``: with
``l2 = 0`` it is soft-thresholding followed by the group shrink; ``l2`` rescales both
thresholds by ``1 + 2·s·l2``.

These functions are also the ``torch`` backend: they use ``torch._foreach_*`` where it
saves launches and keep a few temporaries the size of a single tensor alive at most; 16-bit
tensors are computed in float32 and rounded once, as the kernels compute them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._common import Lr, acc_dtype, group_dims, group_size, lr_step

# Elements per row of a fixed-order reduction. A reduction with one output over more than 32768
# elements is split across threads in a thread-count dependent order; a reduction of rows (many
# outputs, at most this many elements each) reduces each row in one thread, in one order.
_ROW = 8192

def _fixed_order_sums(rows: Tensor, reduce) -> Tensor:
    """``reduce`` (a row reduction to float64: Σ|x|, Σx²) of every row of the 2-D ``rows``, each summed
    in an order that depends neither on the thread count nor on the device: blocks of :data:`_ROW`
    elements, then the blocks' sums in the same way. 1-D float64 result, one value per row."""
    n_rows, length = rows.shape
    while True:
        full = length // _ROW * _ROW
        if full == 0 or (n_rows == 1 and length <= _ROW):
            return reduce(rows).reshape(n_rows)
        parts = reduce(rows[:, :full].reshape(n_rows, full // _ROW, _ROW)).reshape(n_rows, full // _ROW)
        if full < length:
            parts = torch.cat([parts, reduce(rows[:, full:]).reshape(n_rows, 1)], dim=1)
        rows, length, reduce = parts, parts.shape[1], _sum_rows


def _sum_rows(x: Tensor) -> Tensor:
    return x.sum(dim=-1, dtype=torch.float64)


def _abs_rows(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, 1, dim=-1, dtype=torch.float64)


def _square_rows(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, 2, dim=-1, dtype=torch.float64).square()


def _group_rows(t: Tensor, groups: str) -> Tensor:
    """The groups of ``t`` as the rows of a 2-D tensor (a view where the layout allows, else a copy)."""
    dims = group_dims(t, groups)
    if dims is None:
        return t.reshape(1, t.numel())
    size = group_size(t, groups)
    if groups == "row":
        return t.reshape(t.shape[0], size)
    return t.movedim(1, 0).reshape(t.shape[1], size)


def _scales(amax: Tensor) -> tuple[Tensor, Tensor]:
    """Two powers of two whose product brings ``amax`` (float64) into [0.5, 1) (1 and 1 for 0, inf, NaN).

    Two factors, because the one scale of a subnormal (or near-overflow) float64 value is outside
    float64's range; each multiplication by a power of two is exact."""
    _, exponent = torch.frexp(amax)
    exponent = torch.where(torch.isfinite(amax) & (amax > 0), exponent, 0)
    half = torch.div(-exponent, 2, rounding_mode="floor")
    two = torch.ones_like(amax) * 2
    return torch.pow(two, half), torch.pow(two, -exponent - half)


def group_norms(t: Tensor, groups: str) -> Tensor:
    """‖w_g‖₂ of every group of ``t`` in float64, shaped to broadcast against ``t``.

    Σw² is accumulated in float64, where the squares of every float32 / float16 / bfloat16 value
    are exact in range; float64 groups are first scaled by a power of two that brings their largest
    magnitude to [0.5, 1), so no group norm overflows or underflows for finite weights. The sums
    are in a fixed order (see :func:`_fixed_order_sums`)."""
    rows = _group_rows(t, groups)
    if t.dtype == torch.float64 and rows.numel():
        amax = torch.linalg.vector_norm(rows, math.inf, dim=1, keepdim=True)
        first, second = _scales(amax)
        norm = _fixed_order_sums(rows * first * second, _square_rows).sqrt().reshape(amax.shape) / first / second
    else:
        norm = _fixed_order_sums(rows, _square_rows).sqrt()
    dims = group_dims(t, groups)
    if dims is None:
        return norm.reshape(())
    shape = [1] * t.dim()
    shape[0 if groups == "row" else 1] = t.shape[0 if groups == "row" else 1]
    return norm.reshape(shape)


def _per_tensor(params: list[Tensor], ord: int) -> Tensor:
    """Σ|w| (``ord=1``) or Σw² (``ord=2``) of each tensor, 1-D in the accumulation dtype (summed in float64,
    in a fixed order: small tensors in one ``_foreach_norm``, each within one thread)."""
    reduce = _abs_rows if ord == 1 else _square_rows
    small = [i for i, t in enumerate(params) if t.numel() <= _ROW]
    sums: list[Tensor | None] = [None] * len(params)
    if small:
        found = torch._foreach_norm([params[i] for i in small], ord, dtype=torch.float64)
        for i, value in zip(small, found):
            sums[i] = value if ord == 1 else value.square()
    for i, t in enumerate(params):
        if sums[i] is None:
            sums[i] = _fixed_order_sums(t.reshape(1, -1), reduce).reshape(())
    return torch.stack(sums).to(acc_dtype(params[0].dtype))


def norms(params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-tensor Σ|w| and Σw², each a 1-D tensor of ``len(params)`` in the accumulation dtype."""
    return _per_tensor(params, 1), _per_tensor(params, 2)


def _group_term(params: list[Tensor], groups: str) -> Tensor:
    """Σ over tensors and their groups of √|g|·‖w_g‖₂ (without the ``group_lasso`` factor), in float64."""
    terms = [_fixed_order_sums(group_norms(t, groups).reshape(1, -1), _sum_rows).reshape(())
             * math.sqrt(group_size(t, groups)) for t in params]
    return torch.stack(terms).sum()


def penalty(params: list[Tensor], l1: float, l2: float, group_lasso: float, groups: str) -> Tensor:
    """The penalty value as a 0-dim tensor in the accumulation dtype. Zero coefficients are skipped."""
    acc = acc_dtype(params[0].dtype)
    value = torch.zeros((), dtype=acc, device=params[0].device)
    if l1:
        value = value + l1 * _per_tensor(params, 1).sum()
    if l2:
        value = value + l2 * _per_tensor(params, 2).sum()
    if group_lasso:
        value = value + (group_lasso * _group_term(params, groups)).to(acc)
    return value


def _group_direction(t: Tensor, groups: str) -> Tensor:
    """√|g|·w_g/‖w_g‖₂ (0 for a zero group), in float64: each element divided by its group's norm, so
    that no factor overflows, however small or large the group."""
    norm = group_norms(t, groups)
    return t.to(torch.float64) / torch.where(norm == 0, 1, norm) * math.sqrt(group_size(t, groups))


def sign(w: Tensor) -> Tensor:
    """``torch.sign(w)`` except that NaN stays NaN (torch gives 0): a NaN weight gets a NaN gradient."""
    return torch.where(torch.isnan(w), w, torch.sign(w))


def _axpy(out: Tensor | None, coef: float | Tensor, x: Tensor) -> Tensor:
    """out + coef·x, in place into ``out`` (a new tensor when ``out`` is None); ``coef`` a float or tensor."""
    if out is None:
        return x * coef
    if isinstance(coef, Tensor):
        return out.addcmul_(x, coef)
    return out.add_(x, alpha=coef)


def _add_grad(out: Tensor | None, w: Tensor, l1: float | Tensor, l2: float | Tensor,
              group_lasso: float | Tensor, groups: str) -> Tensor | None:
    """out + l1·sign(w) + 2·l2·w + group term (in place unless ``out`` is None); a float 0 term is skipped."""
    if isinstance(l1, Tensor) or l1:
        out = _axpy(out, l1, sign(w)) if out is not None else sign(w).mul_(l1)
    if isinstance(l2, Tensor) or l2:
        out = _axpy(out, 2 * l2, w)
    if isinstance(group_lasso, Tensor) or group_lasso:
        out = _axpy(out, group_lasso, _group_direction(w, groups))
    return out


def penalty_backward(grad: Tensor, params: list[Tensor], l1: float, l2: float,
                     group_lasso: float, groups: str) -> list[Tensor]:
    """``grad`` (0-dim) times the penalty's gradient, one new tensor per param."""
    grad = grad.to(acc_dtype(params[0].dtype))
    coefs = [c and grad * c for c in (l1, l2, group_lasso)]
    grads = []
    for w in params:
        out = _add_grad(None, w.to(grad.dtype), *coefs, groups)  # 16-bit weights widened: one rounding at the end
        grads.append(torch.zeros_like(w) if out is None else out.to(w.dtype))
    return grads


def _scaled_groups(w: Tensor, groups: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``u = w_g/s_g``, ``‖u_g‖₂`` (1 for a zero group), whether the group is nonzero, and ``s_g``: each group
    divided by its largest |w|, held constant (‖w_g‖ = s·‖w_g/s‖ for any s > 0, so every derivative stays exact),
    so that no square overflows or underflows; ``s_g`` is 1 for a zero group and for one holding an inf or NaN,
    which then propagates as unscaled. Differentiable to any order at any ``w``."""
    dims = group_dims(w, groups)
    amax = w.detach().abs()
    amax = amax.amax() if dims is None else amax.amax(dim=dims, keepdim=True)
    scale = torch.where((amax > 0) & torch.isfinite(amax), amax, torch.ones_like(amax))
    u = w / scale
    square = u * u
    sq_sum = square.sum() if dims is None else square.sum(dim=dims, keepdim=True)
    nonzero = sq_sum > 0
    return u, torch.where(nonzero, sq_sum, torch.ones_like(sq_sum)).sqrt(), nonzero, scale


def penalty_differentiable(params: list[Tensor], l1: float, l2: float, group_lasso: float,
                           groups: str) -> Tensor:
    """:func:`penalty` written with differentiable torch ops only, for autograd's transforms (forward
    mode, ``torch.func.grad``, ``vmap``, Hessians): the same value, the same first derivative, and
    second derivatives as :func:`penalty_hvp`. 0-dim, accumulation dtype."""
    acc = acc_dtype(params[0].dtype)
    value = torch.zeros((), dtype=acc, device=params[0].device)
    for w in params:
        w = w.to(acc)
        if l1:
            value = value + l1 * w.abs().sum()
        if l2:
            value = value + l2 * (w * w).sum()
        if group_lasso and w.numel():
            _, norm, nonzero, scale = _scaled_groups(w, groups)
            value = value + group_lasso * math.sqrt(group_size(w, groups)) * torch.where(nonzero, scale * norm,
                                                                                          0).sum()
    return value


def penalty_hvp(params: list[Tensor], vectors: list[Tensor], l1: float, l2: float, group_lasso: float,
                groups: str) -> list[Tensor]:
    """The penalty's Hessian times ``vectors``, one tensor per param (param dtype), differentiable again.

    ``l1`` adds nothing (``sign`` is flat away from 0, and taken as flat at 0); ``l2`` adds
    ``2·l2·v``; the group term adds ``group_lasso·√|g|/‖w_g‖·(v_g − w_g·⟨w_g, v_g⟩/‖w_g‖²)``, 0 for a
    zero group (where the gradient is taken as 0).
    """
    out = []
    for w, v in zip(params, vectors):
        acc = acc_dtype(w.dtype)
        w_acc, v_acc = w.to(acc), v.to(acc)
        hv = torch.zeros_like(w_acc)
        if l2:
            hv = hv + (2 * l2) * v_acc
        if group_lasso and w.numel():
            # In the scaled group u = w_g/s: w_g·⟨w_g, v_g⟩/‖w_g‖² = (u/‖u‖)·(⟨u, v_g⟩/‖u‖) and ‖w_g‖ = s·‖u‖, so that
            # nothing overflows or underflows before the last division (a zero bracket stays 0 for a tiny norm).
            u, norm, nonzero, scale = _scaled_groups(w_acc, groups)
            dims = group_dims(w, groups)
            dot = (u * v_acc).sum() if dims is None else (u * v_acc).sum(dim=dims, keepdim=True)
            bracket = v_acc - (u / norm) * (dot / norm)
            term = (group_lasso * math.sqrt(group_size(w, groups))) * (bracket / (scale * norm))
            hv = hv + torch.where(nonzero, term, 0)
        out.append(hv.to(w.dtype))
    return out


def add_penalty_grad_(params: list[Tensor], grads: list[Tensor], l1: float, l2: float,
                      group_lasso: float, groups: str) -> Tensor:
    """``grads[i] += ∇penalty(params[i])`` in place; returns the penalty value (accumulation dtype)."""
    value = penalty(params, l1, l2, group_lasso, groups)
    if acc_dtype(params[0].dtype) != params[0].dtype:
        # The whole gradient added in float32 and rounded once, as the kernels add it: each term rounded to 16 bits
        # on its own would lose the sum where the terms cancel, and a coefficient above the dtype's range overflow.
        for w, g in zip(params, grads):
            g.copy_(_add_grad(g.float(), w.float(), l1, l2, group_lasso, groups))
        return value
    if l2:
        torch._foreach_add_(grads, params, alpha=2 * l2)
    for w, g in zip(params, grads):
        _add_grad(g, w, l1, 0.0, group_lasso, groups)
    return value


def prox_(params: list[Tensor], lr_tensor: Tensor | None, lr: float, l1: float, l2: float, group_lasso: float,
          groups: str) -> None:
    """The proximal step of the penalty in place; the step is ``lr_tensor`` (0-dim) when given, else ``lr``."""
    prox_step_(params, lr_step(params, lr_tensor, lr), l1, l2, group_lasso, groups)


def prox_step_(params: list[Tensor], lr: Lr, l1: float, l2: float, group_lasso: float, groups: str) -> None:
    """The proximal step of the penalty with step ``lr`` (a float, or a 0-dim tensor on the params' device in
    their accumulation dtype), in place."""
    shrink = 1 / (1 + 2 * lr * l2) if l2 else None
    threshold = lr * l1 if l1 else None
    for param in params:
        # 16-bit params stepped in float32 and rounded once (a threshold rounded to 16 bits would move the result,
        # or overflow).
        w = param.to(acc_dtype(param.dtype))
        if threshold is not None:
            # w − clamp(w, −t, t) is the soft threshold, exactly 0 where |w| ≤ t.
            w.sub_(torch.clamp(w, -threshold, threshold))
        if shrink is not None:
            w.mul_(shrink)
        if group_lasso:
            norm = group_norms(w, groups)
            coef = lr * group_lasso * math.sqrt(group_size(w, groups))
            if shrink is not None:
                coef = coef * shrink
            # float64 (a true division: Python's number / tensor multiplies by the reciprocal, which overflows
            # for a subnormal norm): a tiny norm gives coef/norm = inf and factor 0; a zero group stays 0.
            coef = torch.as_tensor(coef, dtype=torch.float64, device=norm.device)
            factor = torch.clamp_min(1 - coef / torch.where(norm == 0, 1, norm), 0)
            w.mul_(torch.where(norm == 0, 0, factor).to(w.dtype))
        if w is not param:
            param.copy_(w)
