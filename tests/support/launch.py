"""`launch_two_cpu_processes`: run a worker script under `accelerate launch` with 2 gloo CPU processes."""

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_cpu_processes(worker: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    # accelerate 1.x: `--cpu` with several processes needs mpirun; torchrun (`--multi_gpu`) + ACCELERATE_USE_CPU
    # gives gloo CPU processes on any machine
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    return subprocess.run([*launch, worker, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
