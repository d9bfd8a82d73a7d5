"""`viditq` failures: one line on stderr (`viditq <command>: error: ...`), exit 2 for a wrong command line, 1 for
work that failed, 130 for Ctrl-C; a traceback only with --debug. Output paths are checked before any work."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from viditq_diffusers.cli import main
from viditq_diffusers.testing.zoo import build_tiny_pixart_pipeline

REPO = Path(__file__).resolve().parents[2]
VIDITQ = str(Path(sys.executable).with_name("viditq"))
ENV = dict(os.environ, PYTHONPATH=str(REPO))  # this checkout's package, also when another one is installed
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def viditq(*args, prefix=(), env=None, cwd=None):
    return subprocess.run([*prefix, VIDITQ, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env or ENV, cwd=cwd)


def error_line(result, command: str, status: int) -> str:
    """The one error line of a failed run (progress bars may precede it); no traceback."""
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"viditq {command}: error: "), result.stderr
    assert sum(line.startswith("viditq ") and ": error: " in line for line in lines) == 1
    return lines[-1]


def in_tiny_mount(mount: Path, options: str) -> list[str]:
    """A command prefix that runs the command with a fresh tmpfs (`options`: "size=64k" for a full disk, "ro" for
    a read-only one) on `mount`, in its own user and mount namespace: no root needed, nothing left mounted."""
    mount.mkdir(exist_ok=True)
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
              f'mount -t tmpfs -o {options} tmpfs "{mount}" && exec "$@"', "sh"]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode:
        pytest.skip("no user + mount namespaces here (unshare): cannot mount a tiny or read-only file system")
    return prefix


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(FP tiny pipeline, its W8A8 copy, a prompts file)."""
    base = tmp_path_factory.mktemp("cli")
    src = build_tiny_pixart_pipeline(base / "pipe")
    assert main(["quantize", src, "--preset", "w8a8", "--out", str(base / "q8")]) == 0
    (base / "prompts.txt").write_text("a thick digit 7\n")
    return Path(src), base / "q8", base / "prompts.txt"


@pytest.mark.parametrize("argv, named", [
    (["demo", "--steps", "0"], "argument --steps: must be an integer in [2, 1000], got 0"),
    (["demo", "--steps", "1"], "argument --steps: must be an integer in [2, 1000], got 1"),
    (["demo", "--steps", "2.5"], "argument --steps: must be an integer, got '2.5'"),
    (["calibrate", "P", "--prompts", "F", "--out", "S", "--guidance", "nan"], "argument --guidance: must be a finite"),
    (["calibrate", "P", "--prompts", "F", "--out", "S", "--height", "30"], "argument --height: must be an integer"),
    (["calibrate", "P", "--prompts", "F", "--out", "S", "--width", "-8"], "argument --width: must be an integer"),
    (["calibrate", "P", "--prompts", "F", "--out", "S", "--buckets", "0"], "argument --buckets: must be an integer"),
    (["calibrate", "P", "--prompts", "F", "--out", "S", "--seed", "-1"], "argument --seed: must be an integer"),
    (["search", "P", "--prompts", "F", "--out", "S", "--budget-bits", "9"], "argument --budget-bits: must be a finite"),
    (["search", "P", "--prompts", "F", "--out", "S", "--budget-bits", "inf"], "argument --budget-bits"),
    (["search", "P", "--prompts", "F", "--out", "S", "--budget-bits", "5", "--candidates", "0"], "--candidates"),
    (["search", "P", "--prompts", "F", "--out", "S", "--budget-bits", "5", "--block-ranges", "0"], "--block-ranges"),
    (["search", "P", "--prompts", "F", "--out", "S", "--budget-bits", "5", "--max-latency", "0"],
     "argument --max-latency: must be a finite number >= 0.001, got '0'"),
    (["search", "P", "--prompts", "F", "--out", "S", "--budget-bits", "5", "--max-latency", "nan"], "--max-latency"),
    (["search", "P", "--prompts", "F", "--out", "S", "--budget-bits", "5", "--cost-tokens", "0"],
     "argument --cost-tokens: must be an integer >= 1"),
    (["quantize", "P", "--out", "D", "--weight-bits", "3"], "argument --weight-bits: invalid choice: 3"),
    (["quantize", "P", "--out", "D", "--weight-bits", "8.7"], "argument --weight-bits: invalid int value: '8.7'"),
    (["quantize", "P", "--out", "D", "--act-bits", "4"], "argument --act-bits: invalid choice: 4"),
    (["quantize", "P", "--out", "D", "--group-size", "0"], "argument --group-size: must be an integer >= 1"),
    (["quantize", "P"], "the following arguments are required: --out"),
    (["demo", "--seed", "1"], "unrecognized arguments: --seed 1"),  # under the command's name, not plain `viditq`
])
def test_bad_argument_values_are_usage_errors_naming_the_option(argv, named, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"viditq {argv[0]}: error: {err.split(': error: ', 1)[1]}" and err.count("\n") == 1, err
    assert named in err


@pytest.mark.slow  # a real `viditq` process (torch and diffusers imported anew): several seconds
def test_existing_file_as_out_is_refused_before_loading(pipes, tmp_path, capsys):
    src, _, _ = pipes
    (tmp_path / "afile").write_text("x")
    result = viditq("quantize", src, "--out", tmp_path / "afile")
    assert f"--out '{tmp_path / 'afile'}' is an existing file; pass a folder" in error_line(result, "quantize", 1)
    assert "Loading pipeline components" not in result.stderr and (tmp_path / "afile").read_text() == "x"
    assert main(["quantize", str(src), "--out", str(tmp_path / "afile" / "sub")]) == 1
    assert "lies under the file" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path)]) == 1
    assert f"--out '{tmp_path}' is a folder; pass a file path inside it" in capsys.readouterr().err


@pytest.mark.slow  # a real `viditq` process (torch and diffusers imported anew): several seconds
def test_calibrate_out_in_missing_folder_fails_before_the_run(pipes, tmp_path):
    src, _, prompts = pipes
    out = tmp_path / "missing" / "s.safetensors"
    result = viditq("calibrate", src, "--prompts", prompts, "--out", out, "--steps", "2")
    line = error_line(result, "calibrate", 1)
    assert f"the folder of --out '{out}' does not exist" in line
    assert "prompt/s" not in result.stderr  # the calibration's progress bar never started


def test_calibrate_without_size_uses_the_models_own(pipes, tmp_path, capsys):
    """It failed with diffusers' bare "Invalid sample size": PixArt's resolution binning has no table for the
    tiny transformer's size. Binning is off now, as with an explicit size; the native size is square."""
    src, _, prompts = pipes
    assert main(["calibrate", str(src), "--prompts", str(prompts), "--out", str(tmp_path / "s.safetensors"),
                 "--steps", "2"]) == 0, capsys.readouterr().err
    assert (tmp_path / "s.safetensors").stat().st_size > 0


def test_quantize_of_a_quantized_folder(pipes, tmp_path, capsys):
    """Another preset exited 0 and kept the old bits (diffusers keeps the stored config): refused now. The same
    preset re-saves the checkpoint unchanged."""
    _, q8, _ = pipes
    assert main(["quantize", str(q8), "--preset", "w4a8", "--out", str(tmp_path / "q4")]) == 2
    err = capsys.readouterr().err
    assert "is already ViDiT-Q quantized: its transformer holds preset w8a8, weight_bits 8" in err
    assert "pass --preset w8a8 with no other quantization options to copy it" in err
    assert not (tmp_path / "q4").exists()
    assert main(["quantize", str(q8), "--preset", "w8a8", "--weight-bits", "4", "--out", str(tmp_path / "q")]) == 2
    assert main(["quantize", str(q8), "--preset", "w8a8", "--keep-fp", "x", "--out", str(tmp_path / "q")]) == 2
    assert "--keep-fp would be ignored" in capsys.readouterr().err
    assert main(["quantize", str(q8), "--preset", "w8a8", "--out", str(tmp_path / "copy")]) == 0
    before, after = load_file(q8 / WEIGHTS), load_file(tmp_path / "copy" / WEIGHTS)
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)


def test_calibration_is_asked_for_as_the_cli_option(pipes, tmp_path, capsys):
    """The config's error advised `calibration=stats` (a Python keyword); the CLI names --calibration, which
    `viditq quantize` now has, and it works with the statistics of `viditq calibrate`."""
    src, _, prompts = pipes
    assert main(["quantize", str(src), "--preset", "smooth_w4a8", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "--preset smooth_w4a8 needs activation statistics" in err and "--calibration stats.safetensors" in err
    assert "calibration=" not in err
    stats = tmp_path / "s.safetensors"
    assert main(["calibrate", str(src), "--prompts", str(prompts), "--out", str(stats), "--steps", "2"]) == 0
    assert main(["quantize", str(src), "--preset", "w8a16", "--calibration", str(stats),
                 "--out", str(tmp_path / "q")]) == 2
    assert "--preset w8a16 uses no calibration statistics: leave out --calibration" in capsys.readouterr().err
    assert main(["quantize", str(src), "--preset", "smooth_w4a8", "--calibration", str(stats),
                 "--out", str(tmp_path / "q")]) == 0
    balancing = capsys.readouterr().out.split("channel balancing: ")[1].splitlines()[0]
    assert "smooth" in balancing, balancing


@pytest.mark.slow  # a real `viditq` process (torch and diffusers imported anew): several seconds
def test_info_on_a_folder_without_weights(pipes, tmp_path):
    """A ViDiT-Q config.json with no safetensors file: a ZeroDivisionError traceback before."""
    _, q8, _ = pipes
    (tmp_path / "transformer").mkdir()
    shutil.copy(q8 / "transformer" / "config.json", tmp_path / "transformer")
    shutil.copy(q8 / "model_index.json", tmp_path)
    line = error_line(viditq("info", tmp_path), "info", 1)
    assert f"'{tmp_path / 'transformer'}' has a ViDiT-Q config.json but no weights" in line
    debug = viditq("--debug", "info", tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "in cmd_info" in debug.stderr
    assert "Traceback" in viditq("info", tmp_path, "--debug").stderr  # after the command too


@pytest.mark.slow  # a real `viditq` process (torch and diffusers imported anew): several seconds
def test_demo_with_a_video_pipeline_names_the_supported_ones(tmp_path):
    line = error_line(viditq("demo", "--pipeline", REPO / "reference_models" / "latte_digits", "--steps", "2",
                             "--out", tmp_path / "g.png"), "demo", 2)
    assert "is a LattePipeline; the demo generates with PixArtAlphaPipeline or PixArtSigmaPipeline only" in line


@pytest.mark.slow  # a real `viditq` process (torch and diffusers imported anew): several seconds
def test_push_with_the_hub_unreachable(pipes, tmp_path):
    """No network (an endpoint that refuses connections): the checkpoint is kept, the error says so."""
    src, _, _ = pipes
    env = dict(ENV, HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_unused", HF_HOME=str(tmp_path / "hf"))
    line = error_line(viditq("quantize", src, "--out", tmp_path / "q", "--push", "user/repo", env=env), "quantize", 1)
    assert f"the checkpoint is saved in {tmp_path / 'q'}, but pushing it to the Hub repo 'user/repo' failed" in line
    assert (tmp_path / "q" / WEIGHTS).exists()


@pytest.mark.slow  # a real `viditq` process (torch and diffusers imported anew): several seconds
def test_read_only_target_fails_before_the_work(pipes, tmp_path):
    src, _, prompts = pipes
    mount = tmp_path / "ro"
    prefix = in_tiny_mount(mount, "ro")
    result = viditq("quantize", src, "--out", mount / "q", prefix=prefix)
    line = error_line(result, "quantize", 1)
    assert f"cannot write --out '{mount / 'q'}': the folder '{mount}' is not writable (Read-only file system)" in line
    assert "Loading pipeline components" not in result.stderr
    result = viditq("calibrate", src, "--prompts", prompts, "--out", mount / "s.safetensors", prefix=prefix)
    assert "is not writable (Read-only file system)" in error_line(result, "calibrate", 1)


@pytest.mark.slow  # a real `viditq` process (torch and diffusers imported anew): several seconds
def test_full_disk(pipes, tmp_path):
    src, _, prompts = pipes
    mount = tmp_path / "small"
    line = error_line(viditq("quantize", src, "--out", mount / "q", prefix=in_tiny_mount(mount, "size=64k")),
                      "quantize", 1)
    assert "No space left on device" in line and "(the disk is full: free space or write to another disk)" in line
    line = error_line(viditq("calibrate", src, "--prompts", prompts, "--steps", "2", "--out", mount / "s.safetensors",
                             prefix=in_tiny_mount(mount, "size=8k")), "calibrate", 1)
    assert "No space left on device (the disk is full" in line


@pytest.mark.slow  # a real `viditq` process (torch and diffusers imported anew): several seconds
def test_ctrl_c_is_one_line_and_exit_130(pipes, tmp_path):
    src, _, prompts = pipes
    (tmp_path / "many.txt").write_text("a digit 7\n" * 50)
    proc = subprocess.Popen([VIDITQ, "calibrate", str(src), "--prompts", str(tmp_path / "many.txt"), "--steps", "50",
                             "--out", str(tmp_path / "s.safetensors")], stderr=subprocess.PIPE, text=True, env=ENV)
    seen = ""
    while "prompt/s" not in seen:  # the calibration runs: main's handlers are in place
        seen += proc.stderr.read(1)
        assert seen or proc.poll() is None
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    lines = (seen + rest).strip().splitlines()
    assert lines[-1] == "viditq calibrate: error: interrupted" and "Traceback" not in rest
    assert not (tmp_path / "s.safetensors").exists()
