"""The contract of every regfast op: its ``torch.library`` schema, written once.

:mod:`regfast._ops` defines each op in the ``regfast`` namespace from these schemas (the op that
picks a backend), and :mod:`regfast._ext` defines the compiled extension's ``regfast_C`` ops from
the same ones, which its C++ kernels implement. Every backend provides, under the op's name, a
function with exactly these arguments, for one (device, dtype) group of tensors. ``(a!)`` marks
what an op writes in place; a step is ``lr_tensor`` (0-dim) when given, else the float ``lr``.
"""

from __future__ import annotations

import re

SCHEMAS = {
    "norms": "(Tensor[] params) -> (Tensor, Tensor)",
    "penalty": "(Tensor[] params, float l1, float l2, float group_lasso, str groups) -> Tensor",
    "penalty_backward": ("(Tensor grad, Tensor[] params, float l1, float l2, float group_lasso, str groups) "
                         "-> Tensor[]"),
    "add_penalty_grad_": ("(Tensor[] params, Tensor(a!)[] grads, float l1, float l2, float group_lasso, "
                          "str groups) -> Tensor"),
    "prox_": ("(Tensor(a!)[] params, Tensor? lr_tensor, float lr, float l1, float l2, float group_lasso, "
              "str groups) -> ()"),
    "sgd_step_": ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor? lr_tensor, "
                  "float lr, float momentum, float dampening, bool nesterov, float weight_decay, bool maximize, "
                  "bool init_buffers, float l1, float l2, float group_lasso, str groups, bool compute_penalty) "
                  "-> Tensor"),
    "adamw_step_": ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
                    "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor? lr_tensor, float lr, float beta1, "
                    "float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, float l1, float l2, "
                    "float group_lasso, str groups, str prox, bool compute_penalty) -> Tensor"),
}



def mutated(name: str) -> tuple[str, ...]:
    """The arguments op ``name`` writes in place: those its schema marks ``(x!)``."""
    return tuple(re.findall(r"Tensor\(\w!\)(?:\[\])? (\w+)", SCHEMAS[name]))
