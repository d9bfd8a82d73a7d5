"""All-or-nothing checkpoint saves (issue 25 items BAD 2 and 3): a save over an older checkpoint (sharded or not,
a model or a whole pipeline) leaves, after a crash at any point, a folder that diffusers' from_pretrained loads as
exactly the old checkpoint or exactly the new one (bit-identical tensors, the same files): never a mix, never a
stale shard. The next save removes what a killed one left.

A crash at every point of a save cannot be produced from outside, so `save_crashing_at(k, ...)` runs the save in
a forked child that dies with `os._exit` (no cleanup runs, as with kill -9) at the k-th file write, folder
creation, rename, link, exchange or removal, for every k until the save completes. One test also kills a real
save with SIGKILL.
"""

import builtins
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import DiffusionPipeline

from viditq_diffusers import ViDiTQConfig, atomic, hub, quantize
from viditq_diffusers.atomic import OLD_PREFIX, TEMP_PREFIX, recover_folder
from viditq_diffusers.testing.zoo import ZOO, build_tiny_pixart_pipeline

PIXART = ZOO["PixArtTransformer2DModel"]
REPO = Path(__file__).resolve().parents[2]
CRASHED = 86  # the exit status of a child that "crashed" at the chosen point
POINTS = [(os, "rename"), (os, "replace"), (os, "link"), (os, "mkdir"), (os, "remove"), (shutil, "rmtree"),
          (atomic, "exchange_folders"), (safetensors.torch, "save_file")]


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def state(obj):
    """{component/tensor name: tensor} of a model or of every torch module in a pipeline."""
    modules = {n: m for n, m in obj.components.items() if isinstance(m, torch.nn.Module)} \
        if hasattr(obj, "components") else {"model": obj}
    return {f"{n}/{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}


def load(folder):
    if (folder / "model_index.json").exists():
        return DiffusionPipeline.from_pretrained(folder)
    return PIXART.cls.from_pretrained(folder)


def snapshot(folder):
    return files(folder), state(load(folder))


def which(folder, references):
    """"A" or "B": the reference whose files and tensors `folder` holds exactly; fails on anything else."""
    found_files, found_state = snapshot(folder)
    for label, (ref_files, ref_state) in references.items():
        if found_files == ref_files and found_state.keys() == ref_state.keys() and all(
                torch.equal(found_state[k], ref_state[k]) for k in ref_state):
            return label
    raise AssertionError(f"{folder} is neither checkpoint: it holds {found_files}")


def leftovers(parent):
    return [p for p in parent.rglob("*") if p.name.startswith((TEMP_PREFIX, OLD_PREFIX))]


def install_failure(k, fail):
    """Make the k-th call of any function in POINTS, or of open() for writing, call `fail()` first."""
    count = [0]

    def hook(function):
        def wrapper(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                fail()
            return function(*args, **kwargs)
        return wrapper

    for module, name in POINTS:
        setattr(module, name, hook(getattr(module, name)))
    real_open, counted_open = builtins.open, hook(builtins.open)
    builtins.open = lambda file, mode="r", *a, **kw: (counted_open if set(mode) & set("wax+") else real_open)(
        file, mode, *a, **kw)


def assert_old_then_new(completed, seen, at_least):
    """The save ran to its end, and the folder held the old checkpoint after a crash at each of the first (at least
    `at_least`: every file of the new one is written before the swap) points, and the new one after the rest."""
    assert completed and seen == ["A"] * seen.count("A") + ["B"] * seen.count("B"), seen
    assert seen.count("A") >= at_least and seen.count("B") >= 2, seen


def save_crashing_at(k, save):
    """Run `save()` in a forked child that dies at the k-th point; True if it got to the end without dying."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            torch.set_num_threads(1)
            install_failure(k, lambda: os._exit(CRASHED))
            save()
            status = 0
        finally:
            os._exit(status)
    deadline = time.monotonic() + 120
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"the save crashing at point {k} hung")
        time.sleep(0.01)
    status = os.waitstatus_to_exitcode(done[1])
    assert status in (0, CRASHED), f"the save crashing at point {k} failed with status {status}"
    return status == 0


def save_failing_at(k, save, monkeypatch):
    """Run `save()` here with the k-th point raising OSError: "raised" if the save raised it, "swallowed" if the
    code caught it (os.makedirs does, for a folder that exists) and went on, None if there was no k-th point."""
    with monkeypatch.context() as patch:
        for module, name in POINTS:
            patch.setattr(module, name, getattr(module, name))  # restored when the block ends
        patch.setattr(builtins, "open", builtins.open)
        hit = []
        install_failure(k, lambda: hit.append(k) or (_ for _ in ()).throw(OSError(5, f"injected at {k}")))
        try:
            save()
        except OSError as error:
            assert error.strerror == f"injected at {k}"
            return "raised"
    return "swallowed" if hit else None


@pytest.fixture(scope="module")
def models():
    """A: W8A8 of one tiny PixArt; B: W4A8 (another plan, other tensor names) of another."""
    return (quantize(PIXART.build(seed=0), ViDiTQConfig(preset="w8a8")),
            quantize(PIXART.build(seed=1), ViDiTQConfig(preset="w4a8", group_size=32)))


SHARDS = {"A": "20KB", "B": "40KB"}  # 5 and 3 shards: a mix or a stale shard would show


@pytest.fixture(scope="module")
def references(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("references")
    for (label, size), model in zip(SHARDS.items(), models):
        model.save_pretrained(root / label, max_shard_size=size)
    return {label: snapshot(root / label) for label in SHARDS}


def test_resave_over_a_sharded_checkpoint_loads_the_new_weights(models, tmp_path):
    """BAD 2: diffusers' cleanup of old shards never saw the target, so the stale index won and from_pretrained
    returned A's weights (or, with another plan, nothing loaded)."""
    a, b = models
    out = tmp_path / "q"
    a.save_pretrained(out, max_shard_size="20KB")
    assert len(list(out.glob("*.safetensors"))) > 1
    b.save_pretrained(out)
    assert files(out) == ["config.json", "diffusion_pytorch_model.safetensors"]
    reloaded = state(PIXART.cls.from_pretrained(out))
    expected = state(b)
    assert reloaded.keys() == expected.keys() and all(torch.equal(reloaded[k], expected[k]) for k in expected)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", ["rename_exchange", "two_renames"])
def test_a_crash_at_every_point_of_a_sharded_save_leaves_old_or_new(models, references, tmp_path, monkeypatch,
                                                                   exchange):
    a, b = models
    out = tmp_path / "q"
    if exchange == "two_renames":  # the fallback where the file system has no RENAME_EXCHANGE
        monkeypatch.setattr(atomic, "exchange_folders", lambda x, y: (_ for _ in ()).throw(OSError(22, "EINVAL")))
    a.save_pretrained(out, max_shard_size=SHARDS["A"])
    seen = []
    for k in range(1, 200):
        completed = save_crashing_at(k, lambda: b.save_pretrained(out, max_shard_size=SHARDS["B"]))
        recover_folder(out)  # what our loaders and the next save do first (a no-op unless two_renames crashed)
        seen.append(which(out, references))
        if completed:
            break
        a.save_pretrained(out, max_shard_size=SHARDS["A"])  # the next save cleans up what the crash left
        assert which(out, references) == "A" and leftovers(tmp_path) == []
    assert_old_then_new(completed, seen, at_least=10)
    assert leftovers(tmp_path) == []


def test_an_error_at_every_point_of_a_sharded_save_leaves_old_or_new(models, references, tmp_path, monkeypatch):
    """An error (a full disk, a permission) at any point: the old checkpoint if the save raised, the new one if
    it went on; never a mix."""
    a, b = models
    out = tmp_path / "q"
    a.save_pretrained(out, max_shard_size=SHARDS["A"])
    seen = []
    for k in range(1, 200):
        outcome = save_failing_at(k, lambda: b.save_pretrained(out, max_shard_size=SHARDS["B"]), monkeypatch)
        seen.append((outcome, which(out, references)))
        if outcome is None:
            break
        a.save_pretrained(out, max_shard_size=SHARDS["A"])
    assert seen[-1] == (None, "B") and all(label == "B" for outcome, label in seen if outcome == "swallowed"), seen
    assert [label for outcome, label in seen if outcome == "raised"].count("A") >= 7, seen  # B has 5 files
    assert leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return [DiffusionPipeline.from_pretrained(build_tiny_pixart_pipeline(root / str(seed), seed=seed),
                                              quantization_config=ViDiTQConfig(**config))
            for seed, config in ((0, dict(preset="w8a8")), (1, dict(preset="w4a8", group_size=32)))]


@pytest.mark.slow
def test_a_crash_at_every_point_of_a_pipeline_save_leaves_old_or_new(pipelines, tmp_path):
    a, b = pipelines
    references = {}
    for label, pipe in zip("AB", pipelines):
        hub.save_pretrained(pipe, tmp_path / "ref" / label, max_shard_size="40KB")
        references[label] = snapshot(tmp_path / "ref" / label)
    out = tmp_path / "work" / "pipe"
    hub.save_pretrained(a, out, max_shard_size="40KB")
    seen = []
    for k in range(1, 400):
        completed = save_crashing_at(k, lambda: hub.save_pretrained(b, out, max_shard_size="40KB"))
        seen.append(which(out, references))
        if completed:
            break
        hub.save_pretrained(a, out, max_shard_size="40KB")
    assert_old_then_new(completed, seen, at_least=30)
    assert leftovers(tmp_path / "work") == []


def test_pipeline_resave_keeps_the_users_readme_and_drops_old_components(pipelines, tmp_path):
    a, b = pipelines
    out = tmp_path / "pipe"
    hub.save_pretrained(a, out, max_shard_size="40KB")
    (out / "README.md").write_text("my notes")
    (out / "samples").mkdir()
    b.transformer.save_pretrained(out / "transformer")  # the quantized component's own save, as diffusers calls it
    hub.save_pretrained(b, out)
    assert (out / "README.md").read_text() == "my notes" and (out / "samples").is_dir()
    reloaded, expected = state(DiffusionPipeline.from_pretrained(out)), state(b)
    assert reloaded.keys() == expected.keys() and all(torch.equal(reloaded[k], expected[k]) for k in expected)


def test_saving_into_a_foreign_folder_is_refused_unless_overwrite(models, tmp_path):
    a, _ = models
    (tmp_path / "holiday").mkdir()
    (tmp_path / "holiday" / "beach.jpg").write_bytes(b"jpeg")
    with pytest.raises(FileExistsError, match=r"holiday' is not empty \(beach\.jpg\).*pass overwrite=True"):
        a.save_pretrained(tmp_path / "holiday")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        hub.save_pretrained(a, tmp_path / "holiday")
    assert files(tmp_path / "holiday") == ["beach.jpg"] and leftovers(tmp_path) == []
    a.save_pretrained(tmp_path / "holiday", overwrite=True)
    assert files(tmp_path / "holiday") == ["beach.jpg", "config.json", "diffusion_pytorch_model.safetensors"]


def test_leftovers_inside_and_beside_the_folder_are_ignored_on_load_and_cleaned_by_the_next_save(
        models, references, tmp_path):
    a, b = models
    out = tmp_path / "q"
    a.save_pretrained(out, max_shard_size=SHARDS["A"])
    inside = out / ".viditq-tmp-k1ll3d00"  # where versions before this one wrote their temporary folder
    inside.mkdir()
    shutil.copy(out / "config.json", inside / "config.json")
    (inside / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    (out / f"{TEMP_PREFIX}{'0' * 32}-config.json").write_text("half")  # a killed atomic_path write
    beside = tmp_path / f"{TEMP_PREFIX}{'1' * 32}-q"
    shutil.copytree(inside, beside)
    ref_files, ref_state = references["A"]
    found_files, found_state = snapshot(out)
    assert [f for f in found_files if TEMP_PREFIX not in f] == ref_files
    assert all(torch.equal(found_state[k], ref_state[k]) for k in ref_state)
    from viditq_diffusers.checkpoint import checkpoint_summary
    assert checkpoint_summary(str(out))["model"]["num_quantized"] > 0
    b.save_pretrained(out, max_shard_size=SHARDS["B"])
    assert which(out, references) == "B" and leftovers(tmp_path) == []


KILLED_SAVE = """
import sys, torch
import viditq_diffusers
from diffusers import PixArtTransformer2DModel
from viditq_diffusers.testing.zoo import ZOO
torch.manual_seed(0)
kwargs = dict(ZOO["PixArtTransformer2DModel"].kwargs, attention_head_dim=64, num_attention_heads=16, num_layers=4)
model = PixArtTransformer2DModel(**kwargs)  # about 250 MB of float32 weights
print("saving", flush=True)
viditq_diffusers.save_pretrained(model, sys.argv[1], max_shard_size="20MB")
print("saved", flush=True)
"""


@pytest.mark.slow
def test_a_big_save_killed_with_sigkill_leaves_the_old_checkpoint(models, references, tmp_path):
    a, b = models
    out = tmp_path / "q"
    a.save_pretrained(out, max_shard_size=SHARDS["A"])
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_SAVE), str(out)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline() == "saving\n"
        deadline = time.monotonic() + 120
        while not [p for p in tmp_path.glob(f"{TEMP_PREFIX}*-q/*.safetensors")
                   if p.stat().st_size > 0 and len(list(p.parent.glob("*.safetensors"))) >= 3]:
            assert child.poll() is None and time.monotonic() < deadline, "the save ended before it could be killed"
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert len(leftovers(tmp_path)) == 1  # the killed save's temporary folder, beside the checkpoint
    assert which(out, references) == "A"
    b.save_pretrained(out, max_shard_size=SHARDS["B"])
    assert which(out, references) == "B" and leftovers(tmp_path) == []
