"""`release_file_pages`: a consumed weight's pages of a mapped safetensors file leave the resident set, its
bytes read back unchanged from the file, and nothing else is touched (anonymous memory, neighbours' pages)."""

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from viditq_diffusers.load_memory import file_mapping, release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise: Linux")
MIB = 2**20


def resident_file_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.fixture
def shard(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(4096, 2048, generator=generator).bfloat16(),  # 16 MiB
               "small": torch.randn(3, 5, generator=generator)}  # shares a page with "big"'s neighbours
    path = tmp_path / "shard.safetensors"
    save_file(tensors, path)
    return path, tensors


def test_a_read_weight_leaves_the_resident_set_and_reads_back_the_same(shard):
    path, saved = shard
    with safe_open(path, framework="pt", device="cpu") as f:
        big, small = f.get_slice("big")[...], f.get_slice("small")[...]
        assert file_mapping(big.data_ptr()) is not None  # a view of the mapped file, as transformers loads it
        assert torch.equal(big, saved["big"]) and torch.equal(small, saved["small"])  # read: pages resident
        before = resident_file_bytes()
        released = release_file_pages(big)
        assert 16 * MIB - 2 * 4096 <= released <= 16 * MIB
        assert before - resident_file_bytes() >= 12 * MIB  # gone from RSS (the rest: other file pages' noise)
        assert torch.equal(big, saved["big"]) and torch.equal(small, saved["small"])  # faulted back from the file


def test_memory_that_is_not_a_file_mapping_is_left_alone(shard):
    anonymous = torch.randn(1024, 1024)
    copy = anonymous.clone()
    assert file_mapping(anonymous.data_ptr()) is None
    assert release_file_pages(anonymous) == 0 and torch.equal(anonymous, copy)
    assert release_file_pages(torch.empty(0)) == 0
    path, saved = shard
    with safe_open(path, framework="pt", device="cpu") as f:
        strided = f.get_slice("big")[...].t()
        assert release_file_pages(strided) == 0  # not contiguous: its bytes are not one range
        small = f.get_slice("small")[...]
        assert release_file_pages(small) == 0  # 60 bytes: no whole page of its own
        assert torch.equal(small, saved["small"])
