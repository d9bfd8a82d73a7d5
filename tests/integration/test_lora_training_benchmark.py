"""benchmarks/lora_training.py at a tiny size: the whole benchmark (three child processes: FP32, W8A8, W4A8) trains
the mirror LoRA a few steps on each reference transformer and prints one table row per variant."""

import pytest

pytest.importorskip("peft")

from benchmarks.lora_training import COLUMNS, SMOKE, main, parse, table  # noqa: E402


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_a_failed_variant_keeps_its_row_with_the_reason():
    fp = dict(variant="fp32", steps=3, step_s=0.5, peak_rss_mib=600.0, final_loss=0.05, upright=0.5, flipped=0.9,
              mirrored=0.4)
    lines = table([fp, dict(variant="w8a8", error="killed by signal 9 (out of memory?)")]).splitlines()
    assert cells(lines[0]) == list(COLUMNS) and len(lines) == 4
    assert cells(lines[2]) == ["FP32", "3", "0.50", "600", "0.0500", "90.0%", "-", "+0.40"]
    assert cells(lines[3])[:2] == ["ViDiT-Q W8A8", "failed: killed by signal 9 (out of memory?)"]
    assert len(cells(lines[3])) == len(COLUMNS)


@pytest.mark.slow
def test_the_smoke_run_prints_one_row_per_variant(capsys):
    results = main(["--smoke"])
    lines = capsys.readouterr().out.strip().splitlines()[-5:]
    assert cells(lines[0]) == list(COLUMNS)
    rows = [cells(line) for line in lines[2:]]
    assert [row[0] for row in rows] == ["FP32", "ViDiT-Q W8A8", "ViDiT-Q W4A8"]
    assert all(len(row) == len(COLUMNS) and row[1] == str(SMOKE["steps"]) for row in rows)
    assert [r["variant"] for r in results] == ["fp32", "w8a8", "w4a8"] and not any("error" in r for r in results)
    for r in results:
        assert r["steps"] == SMOKE["steps"] and r["step_s"] > 0 and r["peak_rss_mib"] > 100  # each child's own peak
        assert 0 < r["final_loss"] < 1  # the epsilon loss of a trained denoiser
        assert 0 <= r["flipped"] <= 1 and r["mirrored"] == pytest.approx(r["flipped"] - r["upright"])


def test_smoke_sets_tiny_defaults_and_a_given_flag_wins():
    assert {k: getattr(parse(["--smoke"]), k) for k in SMOKE} == SMOKE
    args = parse(["--smoke", "--steps", "9"])
    assert args.steps == 9 and args.pool == SMOKE["pool"]
    assert parse([]).steps == 362 and parse([]).batch == 64  # the shipped LoRA's run
