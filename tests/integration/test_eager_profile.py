"""benchmarks/eager_profile.py at 1 block, 1 repeat, eager only: its category table has one row per category and one
column per variant, and the categories add up to the forward's wall time."""

import re

import pytest
import torch

from benchmarks import eager_profile
from benchmarks.eager_profile import ATTENTION, CATEGORIES, COPIES, FLOAT_LINEAR, FUSED, NORM, OTHER, QUANTIZED


def test_category_of_op_names():
    assert eager_profile.category("viditq::linear") == QUANTIZED
    assert eager_profile.category("aten::addmm") == FLOAT_LINEAR
    assert eager_profile.category("aten::_scaled_dot_product_flash_attention_for_cpu") == ATTENTION
    assert eager_profile.category("aten::native_layer_norm") == NORM
    assert eager_profile.category("aten::_to_copy") == COPIES
    assert eager_profile.category("graph_0_cpp_fused_gelu_view_6") == FUSED
    assert eager_profile.category("aten::empty") == OTHER
    assert eager_profile.category("## Call CompiledFxGraph abc ##") is None  # a wrapper: its children decide


def test_table_at_one_block(capsys):
    threads = torch.get_num_threads()
    results = eager_profile.main(["--layers", "1", "--repeats", "1", "--no-compile", "--top", "3"])
    out = capsys.readouterr().out
    assert list(results) == ["bf16 eager", "W8A8 eager"]
    assert torch.get_num_threads() == threads  # it profiles on 1 thread and gives the caller's count back

    rows = [line for line in out.splitlines() if line.startswith("| ") and "ms (share)" not in line]
    table = {line.split(" | ")[0].removeprefix("| "): line for line in rows}
    assert list(table)[:len(CATEGORIES) + 3] == [*CATEGORIES, "total (sum of the medians)", "profiled wall, median",
                                                 "unprofiled wall, median"]
    for line in table.values():
        assert line.count("|") == 2 + len(results)  # the category and one cell per variant

    for label, result in results.items():
        seconds = result["seconds"]
        assert set(seconds) == set(CATEGORIES)
        # one repeat: the categories, "outside ops" included, are the profiled wall time
        assert sum(seconds.values()) == pytest.approx(result["wall"], rel=1e-6)
        assert sum(seconds.values()) - seconds[CATEGORIES[-1]] > 0.5 * result["wall"]  # most of it inside ops
        assert seconds[ATTENTION] > 0 and seconds[NORM] > 0
        assert seconds[FUSED] == 0  # eager: no inductor kernels
    assert results["bf16 eager"]["seconds"][QUANTIZED] == 0
    assert results["W8A8 eager"]["seconds"][QUANTIZED] > results["W8A8 eager"]["seconds"][FLOAT_LINEAR] > 0
    assert results["W8A8 eager"]["calls"][QUANTIZED] == 10  # per block: q, k, v, out x 2 attentions, 2 FFN linears

    shares = [float(m) for m in re.findall(r"\(([\d.]+)%\)", table[QUANTIZED] + table[ATTENTION])]
    assert len(shares) == 2 * len(results) and all(0 <= s <= 100 for s in shares)
