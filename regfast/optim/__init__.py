"""Proximal optimizers: the penalty handled by its proximal step, which gives exact zeros.

- :class:`Proximal` wraps any ``torch.optim`` optimizer and applies :func:`regfast.prox_` after
  its step (one extra pass over the params).
- :class:`ProxSGD` and :class:`ProxAdamW` are ``torch.optim.SGD`` / ``torch.optim.AdamW`` with
  the proximal step fused into the update (ops ``regfast::sgd_step_`` / ``regfast::adamw_step_``).

Every param group may set its own ``l1``, ``l2``, ``group_lasso`` and ``groups``
(see :func:`regfast.param_groups`).
"""

from .prox_adamw import ProxAdamW
from .prox_sgd import ProxSGD
from .proximal import Proximal

__all__ = ["ProxAdamW", "ProxSGD", "Proximal"]
