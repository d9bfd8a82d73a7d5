"""Memory handed back to the OS while a model is quantized as it loads, so the peak stays near the quantized size.

Two things would otherwise keep the peak RSS at about the float model's size (T5-XXL: 9.5 GB of bf16 for a 5 GB
quantized encoder):

1. **Mapped checkpoint pages.** transformers and diffusers map each safetensors shard and hand out tensors that
   are views of the mapping. A page of such a view, once read, counts as resident until the file is closed at the
   end of the load, though a quantized weight is read once and never again. `release_file_pages` drops a consumed
   tensor's pages with `madvise(MADV_DONTNEED)`: only the whole pages inside its bytes (never a neighbour's), and
   only in a private file mapping, where a later read would fault the file's bytes back in. Anything else (a copy,
   an anonymous buffer, not Linux) is left alone.
2. **Freed heap.** Quantizing a layer allocates float temporaries of a few to a few hundred MB beside the integer
   codes that stay. glibc serves the smaller ones from its heap and keeps them when freed, between the codes, so
   the heap grows by about the float size (measured: 0.8 to 3.5 GB of heap after loading a 0.6 GB quantized
   PixArt transformer, varying run to run). `HeapTrim` calls glibc's `malloc_trim` once per `every` bytes of
   float weights quantized, which returns those free pages.

Why by hand: neither safetensors nor the loaders can release part of a mapping, and nothing else trims the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch

MADV_DONTNEED = 4  # Linux
TRIM_EVERY = 64 * 2**20  # float bytes quantized between two heap trims


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def file_mapping(address: int) -> tuple[int, int, str] | None:
    """(start, end, path) of the private file mapping that holds `address`, from /proc/self/maps; None where the
    address is anonymous memory, a shared mapping, or not mapped."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= address < end:
                    path = fields[5].strip() if len(fields) == 6 else ""
                    private = fields[1][3] == "p"
                    return (start, end, path) if private and path.startswith("/") else None
    except OSError:
        return None
    return None


def release_file_pages(tensor: torch.Tensor) -> int:
    """Drop the resident pages that lie wholly inside `tensor`'s bytes where they belong to a private file mapping
    (a safetensors shard mapped by the loader); the bytes released, 0 where nothing was. The caller does not read
    the tensor again (if it did, the file's bytes would come back)."""
    libc = _libc()
    if libc is None or tensor.device.type != "cpu" or tensor.numel() == 0 or not tensor.is_contiguous():
        return 0
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    mapping = file_mapping(begin)
    if mapping is None or end > mapping[1]:
        return 0
    page = mmap.PAGESIZE
    first, last = -(-begin // page) * page, end // page * page
    if last <= first or libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) != 0:
        return 0
    return last - first


class HeapTrim:
    """Return the heap's free pages to the OS once per `every` bytes of float weights quantized (and at `close`)."""

    def __init__(self, every: int = TRIM_EVERY):
        self.every = every
        self.pending = 0

    def quantized(self, weight: torch.Tensor) -> None:
        self.pending += weight.numel() * weight.element_size()
        if self.pending >= self.every:
            self.close()

    def close(self) -> None:
        self.pending = 0
        libc = _libc()
        if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only (not musl)
            libc.malloc_trim(0)
