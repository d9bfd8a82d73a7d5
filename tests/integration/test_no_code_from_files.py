"""No code from files: the project reads safetensors and JSON only, so a crafted file can make a load fail but can
never run code. Two checks: no source file calls a deserializer that can run code, and a pickle planted where a
loader expects safetensors is refused by every loader without its payload running."""

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

from comfyui_nodes import file_format
from viditq_diffusers import ViDiTQConfig
from viditq_diffusers.calibration import CalibrationStats
from viditq_diffusers.checkpoint import checkpoint_summary, load_any
from viditq_diffusers.cli import main as cli
from viditq_diffusers.testing.zoo import ZOO

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
SOURCES = ("viditq_diffusers", "comfyui_nodes", "gradio_app", "harness", "reference", "benchmarks")
# (module, function) pairs that turn bytes into objects by running code: pickle and its relatives, plus eval/exec.
CODE_RUNNING = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("torch", "load"),
                ("marshal", "load"), ("marshal", "loads"), ("shelve", "open"), ("dill", "load"), ("dill", "loads"),
                ("joblib", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("", "eval"), ("", "exec")}
PIXART = ZOO["PixArtTransformer2DModel"]


def calls(tree: ast.AST):
    """(module alias or "", attribute or name, line) of every call in a parsed file."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if isinstance(function, ast.Name):
            yield "", function.id, node.lineno
        elif isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
            yield function.value.id, function.attr, node.lineno


def test_no_source_file_calls_a_deserializer_that_runs_code():
    found = []
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*.py")):
            for module, name, line in calls(ast.parse(path.read_text(encoding="utf-8"))):
                if (module, name) in CODE_RUNNING or (name == "load" and module in ("np", "numpy")):
                    found.append(f"{path.relative_to(REPO)}:{line}: {module + '.' if module else ''}{name}(...)")
    assert not found, "calls that can run code from a file:\n" + "\n".join(found)


class Payload:
    """Unpickling this creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def q_dir(tmp_path_factory):
    fp = tmp_path_factory.mktemp("fp") / "pixart"
    PIXART.build(seed=0).save_pretrained(fp)
    path = tmp_path_factory.mktemp("q") / "pixart-w8a8"
    PIXART.cls.from_pretrained(fp, quantization_config=ViDiTQConfig()).save_pretrained(path)
    return path


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def test_a_pickle_planted_as_checkpoint_weights_is_refused_and_never_runs(q_dir, tmp_path, capsys):
    folder = tmp_path / "planted"
    shutil.copytree(q_dir, folder)
    marker = tmp_path / "ran"
    weights = folder / "diffusion_pytorch_model.safetensors"
    plant(weights, marker)
    for load in (load_any, checkpoint_summary,
                 lambda p: PIXART.cls.from_pretrained(p, quantization_config=ViDiTQConfig())):
        with pytest.raises(Exception, match="diffusion_pytorch_model.safetensors"):
            load(str(folder))
    assert cli(["info", str(folder)]) == 1
    assert "diffusion_pytorch_model.safetensors" in capsys.readouterr().err
    # the same bytes under the old pickle name: the package never falls back to it
    weights.rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(Exception):
        load_any(str(folder))
    assert not marker.exists()


def test_a_pickle_planted_as_a_comfyui_file_or_statistics_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    for name, read in (("model.safetensors", file_format.read), ("stats.safetensors", CalibrationStats.load)):
        path = tmp_path / name
        plant(path, marker)
        with pytest.raises(Exception, match=name):
            read(str(path))
    # a real safetensors file whose JSON metadata carries a pickle, base64 or not, is still only JSON to us
    path = tmp_path / "meta.safetensors"
    save_file({"x": __import__("torch").zeros(1)}, str(path),
              metadata={file_format.METADATA_KEY: json.dumps({"plan": pickle.dumps(Payload(marker)).hex()})})
    with pytest.raises(Exception, match="meta.safetensors"):
        file_format.read(str(path))
    assert not marker.exists()
