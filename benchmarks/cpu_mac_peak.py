"""Instruction-level bound on a CPU integer GEMM: the multiply-accumulate rate of register-blocked microkernels
(`cpu_mac_peak.c`, operands in L1, one thread) for fp32 FMA, exact int16 `vpmaddwd` (int8 x int8 codes widened),
and `vpmaddubsw` u8 x s8 (oneDNN's AVX2 int8 kernel, exact only while a pair of products fits int16).

No library GEMM can beat its microkernel's rate, so the ratios bound what an integer W8A8 route can gain over
fp32 on this CPU (the kernels issue's CPU acceptance asks W8A8 >= 1.5x fp32). Needs gcc and an AVX2 CPU.

    python -m benchmarks.cpu_mac_peak [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

from benchmarks.speed_cpu import cpu_info

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_mac_peak.c")
ROWS = {
    "fp32": ("fp32 FMA (vfmadd231ps), 6 x 16", "what fp32 sgemm runs"),
    "int16": ("int16 vpmaddwd + vpaddd, 4 x 16", "exact int8 x int8 (codes widened to int16)"),
    "u8s8": ("u8 x s8 vpmaddubsw + vpmaddwd + vpaddd, 4 x 16",
             "oneDNN's AVX2 int8; exact for W4 or 7-bit operands, saturates for 8-bit x 8-bit"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of the binary; the table shows the best of them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "cpu_mac_peak")
        subprocess.run(["gcc", "-O3", "-mavx2", "-mfma", SOURCE, "-o", binary], check=True)
        rates: dict[str, list[float]] = {name: [] for name in ROWS}
        for _ in range(args.runs):
            for line in subprocess.run([binary], check=True, capture_output=True, text=True).stdout.splitlines():
                name, seconds, macs = line.split()
                rates[name].append(float(macs) / float(seconds) / 1e9)
    print(cpu_info().splitlines()[0].split(",")[0] + f"; 1 thread; the best of {args.runs} runs, each the best of 5 "
          "(the fastest run is the least disturbed by other load on a shared machine)")
    fp32 = max(rates["fp32"])
    print("| microkernel | GMAC/s | vs fp32 FMA | exactness |")
    print("|---|---:|---:|---|")
    for name, (label, exactness) in ROWS.items():
        rate = max(rates[name])
        print(f"| {label} | {rate:.1f} | {rate / fp32:.2f}x | {exactness} |")
    split = max(rates["u8s8"]) / 2
    print("| u8 x s8 on W8 split in two 4-bit halves (two passes: oneDNN's exact W8 route, our fallback) | "
          f"{split:.1f} | {split / fp32:.2f}x | exact |")


if __name__ == "__main__":
    main()
