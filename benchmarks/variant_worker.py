"""One variant of `benchmarks/speed_cpu.py` in a process of its own: built once, then timed one forward at a time.

    python -m benchmarks.variant_worker '{"label": ..., "layers": 28, "recipes": null, "threads": 2,
                                          "workdir": DIR, "output": DIR/3.safetensors}'

The parent (`speed_cpu.VariantWorker`) talks to it in JSON lines. After the build (and the warm-up forward that
compiles and packs weights) the worker answers `{"nbytes", "routes", "rss", "peak_rss"}`, its output saved at
`output` for the PSNR, or `{"error": reason}` and exits. Then each line `run` is answered with `{"seconds": s}`, the
forward timed here, until its input closes. The build's own prints (ours, a peer's, a compiler's) go to stderr, so
its stdout carries only the answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def failure(err: BaseException) -> str:
    """`Type: first line of the message`, short enough for a table cell."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"


def serve(spec: dict, answer) -> None:
    import torch
    from safetensors.torch import save_file

    from benchmarks import speed_cpu
    from viditq_diffusers.kernels import warmup

    torch.set_num_threads(spec["threads"])
    speed_cpu.calibration_dir = spec["workdir"]
    try:
        warmup()
        dtype, make = speed_cpu.variants(True, spec["recipes"])[spec["label"]]
        variant = speed_cpu.prepare_variant(dtype, make, spec["layers"])
        save_file({"out": variant.pop("out").contiguous()}, spec["output"])
    except Exception as err:  # a peer that does not run here is a row that says why
        answer(error=failure(err))
        return
    speed_cpu._calibrations.clear()  # the statistics are in the quantized layers now
    speed_cpu.release_freed_memory()
    answer(nbytes=variant["nbytes"], routes=variant["routes"], rss=_status_bytes("VmRSS"),
           peak_rss=_status_bytes("VmHWM"))
    model, kwargs, grad_context = variant["model"], variant["kwargs"], variant["grad_context"]
    for line in sys.stdin:
        if line.strip() != "run":
            raise SystemExit(f"variant_worker: unknown command {line.strip()!r}; the commands are 'run' and EOF")
        with grad_context():
            start = time.perf_counter()
            model(**kwargs)
            seconds = time.perf_counter() - start
        answer(seconds=seconds)


def main() -> None:
    spec = json.loads(sys.argv[1])
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everything else written to stdout, by Python or C++, goes to stderr

    def answer(**fields) -> None:
        channel.write(json.dumps(fields) + "\n")

    serve(spec, answer)


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------------------- the parent's side

class WorkerFailed(Exception):
    """The worker could not build its variant, or died: the message is the reason, for the variant's row."""


class VariantWorker:
    """A worker started for `label`; `built()` waits for its build, `run()` times one forward, `close()` ends it."""

    def __init__(self, label: str, layers: int, recipes: str | None, threads: int, workdir: str, index: int):
        self.label, self.output = label, os.path.join(workdir, f"{index}.safetensors")
        spec = dict(label=label, layers=layers, recipes=recipes, threads=threads, workdir=workdir, output=self.output)
        # one inductor compile process, not a pool of them per compiled variant: they would stay resident
        env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.variant_worker", json.dumps(spec)],
                                        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def built(self) -> dict:
        """`{"nbytes", "routes", "rss", "peak_rss"}` once the variant is built and warmed up."""
        return self._answer()

    def run(self) -> float:
        """Seconds of one forward, timed in the worker."""
        try:
            self.process.stdin.write("run\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # it died: `_answer` says how
        return self._answer()["seconds"]

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise WorkerFailed(f"killed by signal {-code} (out of memory?)" if code < 0
                               else f"the worker exited with status {code} (its error is above)")
        fields = json.loads(line)
        if "error" in fields:
            self.process.wait()
            raise WorkerFailed(fields["error"])
        return fields

    def close(self) -> None:
        if self.process.stdin and not self.process.stdin.closed:
            try:
                self.process.stdin.close()  # end of commands: it exits
            except BrokenPipeError:
                pass
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
