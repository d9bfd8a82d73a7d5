import os

import torch

# Without a GPU, the Triton kernels run in Triton's CPU interpreter. Triton reads this when a kernel is
# decorated, so it must be set before any test imports viditq_diffusers.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
