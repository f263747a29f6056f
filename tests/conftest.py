import os

import torch

# Triton's CPU interpreter must be chosen before triton is first imported: without a GPU,
# the Triton kernels are tested in it on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
