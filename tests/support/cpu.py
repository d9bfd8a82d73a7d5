"""Which CPU kernels this machine must build: the C++ kernels are for x86 CPUs with AVX2 (or AVX-512)."""

import platform

import torch

X86_AVX2 = (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
