"""The ``torch`` backend: every regfast op in pure PyTorch, the spec and the test oracle of the others.

Each op has the signature of its ``torch.library`` schema (:mod:`regfast._ops`) and serves one
(device, dtype) group, as every backend's does: :mod:`.penalty` holds ``norms``, ``penalty``,
``penalty_backward``, ``add_penalty_grad_`` and ``prox_`` with the math they share; :mod:`.optim`
the fused optimizer steps ``sgd_step_`` and ``adamw_step_``.
"""

from .optim import adamw_step_, metric_prox_, penalty_gradient_scales, sgd_step_
from .penalty import (
                      add_penalty_grad_,
                      group_norms,
                      norms,
                      penalty,
                      penalty_backward,
                      penalty_differentiable,
                      penalty_hvp,
                      prox_,
                      prox_step_,
                      sign,
)

__all__ = ["add_penalty_grad_", "adamw_step_", "group_norms", "metric_prox_", "norms", "penalty", "penalty_backward",
           "penalty_differentiable", "penalty_gradient_scales", "penalty_hvp", "prox_", "prox_step_", "sgd_step_",
           "sign"]
