import os

import torch

# Without a GPU, the Triton kernels run in Triton's CPU interpreter. Triton reads this when a kernel is
# decorated, so it must be set before any test imports viditq_diffusers.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session):
    """Build (or load) the C++ CPU kernels once, up front: the tests and the app servers they start load them
    from the cache instead of each compiling them for about a minute inside a timed request. All of them, also
    those this CPU's routes do not take (`kernels.warmup` skips those), so each kernel's tests run here."""
    from viditq_diffusers import kernels
    from viditq_diffusers.kernels import cpu_amx, cpu_balance, cpu_direct, cpu_int16

    for module in (cpu_int16, cpu_direct, cpu_amx, cpu_balance):
        module.build()
    kernels.warmup(verbose=False)
