"""The Gradio demo's start time and three-variant generation time, through the app's own API.

    python -m benchmarks.gradio_app [--starts 3] [--requests 5] [--threads 1]

Each start launches `python -m gradio_app --threads N` fresh and times process start -> the page answers 200
("page served"), and -> the first generation returned, requested as soon as the page served (the app loads
torch, the core and the default pipeline in the background after serving; that request waits for them).
Requests go through `gradio_client` to the Generate button's endpoint (`/generate`: FP32, W8A8, W4A8-MP from
one seed, bundled image pipeline, 20 steps, guidance 4.5); after the last start, more requests one at a time
with new seeds time the warm round trip. The per-variant latencies are the ones the app shows. Targets (issue 9):
start < 20 s, three variants < 30 s.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gradio_app.choices import DEFAULT_SOURCE, VARIANTS
from harness.gradio_ui.server import AppServer

PROMPTS = ["a thick handwritten digit 7", "a thin handwritten digit 3", "an italic handwritten digit 5",
           "a faint handwritten digit 0", "a handwritten digit 8"]


def metric(markdown: str, row: str) -> float:
    return float(re.search(rf"\| {row} \| ([\d.]+)", markdown).group(1))


def request(client, i: int):
    return client.predict(DEFAULT_SOURCE, "", PROMPTS[i % len(PROMPTS)], "", i, 20, 4.5, api_name="/generate")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="fresh app starts to time")
    parser.add_argument("--requests", type=int, default=5, help="generations to time on the last start")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the app")
    args = parser.parse_args()
    from gradio_client import Client

    served, first, server = [], [], None
    for i in range(args.starts):
        if server is not None:
            server.stop()
        server = AppServer(Path(tempfile.mkdtemp(prefix="viditq-gradio-bench-")) / "app.log",
                           args=("--threads", str(args.threads)))
        started = time.perf_counter()
        server.start()
        served.append(server.served_after)
        client = Client(server.url, verbose=False)
        request(client, 0)
        first.append(time.perf_counter() - started)
    try:
        rounds, latencies, psnrs = [], {name: [] for name in VARIANTS}, {name: [] for name in VARIANTS[1:]}
        for i in range(args.requests):
            start = time.perf_counter()
            out = request(client, i)
            rounds.append(time.perf_counter() - start)
            for name, markdown in zip(VARIANTS, out[2::2]):
                latencies[name].append(metric(markdown, "latency"))
                if name in psnrs:
                    psnrs[name].append(metric(markdown, "PSNR vs FP"))
    finally:
        server.stop()

    print(f"Gradio demo, bundled image pipeline, {args.threads} torch thread(s); median (min-max)")
    print("| measure | seconds | target |\n|---|---:|---|")
    span = lambda xs: f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"  # noqa: E731
    print(f"| start: process -> page served ({args.starts} starts) | {span(served)} | < 20 s |")
    print(f"| start: process -> first three-variant result ({args.starts} starts) | {span(first)} | |")
    print(f"| Generate via /generate, three variants ({args.requests} requests) | {span(rounds)} | < 30 s |")
    for name in VARIANTS:
        extra = f", PSNR vs FP {statistics.median(psnrs[name]):.1f} dB" if name in psnrs else ""
        print(f"| of which {name} pipeline call{extra} | {span(latencies[name])} | |")
    ok = statistics.median(served) < 20 and max(rounds) < 30
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
