"""viditq_diffusers.atomic: writes land whole under the final name or not at all, a folder is replaced in one step,
and no temporary is left behind (or it is cleaned by the next save)."""

import errno
import json
import os
import stat
import tempfile

import pytest

from viditq_diffusers import atomic
from viditq_diffusers.atomic import OLD_PREFIX, TEMP_PREFIX, atomic_folder, atomic_path, recover_folder

MODEL_CONFIG = json.dumps({"_class_name": "PixArtTransformer2DModel", "_diffusers_version": "0.42.1"})


def leftovers(folder):
    return [p for p in folder.rglob("*") if p.name.startswith((TEMP_PREFIX, OLD_PREFIX))]


def write(folder, files):
    """Write {relative path: text} under `folder`."""
    for name, text in files.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def tree(folder):
    """{relative path: text} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


OLD = {"config.json": MODEL_CONFIG, "diffusion_pytorch_model.safetensors.index.json": "old index",
       "diffusion_pytorch_model-00001-of-00002.safetensors": "old 1",
       "diffusion_pytorch_model-00002-of-00002.safetensors": "old 2"}
NEW = {"config.json": MODEL_CONFIG + " ", "diffusion_pytorch_model.safetensors": "new"}


def test_atomic_path_replaces_the_file(tmp_path):
    target = tmp_path / "plan.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith("plan.json")  # same folder, same extension
        with open(tmp, "w") as f:
            f.write("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new" and leftovers(tmp_path) == []


def test_atomic_path_keeps_the_old_file_on_an_error(tmp_path):
    target = tmp_path / "stats.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_atomic_path_on_an_error_before_anything_was_written(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "new.json"):
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_writes_a_sibling_then_renames_it_in(tmp_path):
    out = tmp_path / "deep" / "out"
    with atomic_folder(out) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path / "deep") and os.path.basename(tmp).startswith(TEMP_PREFIX)
        os.makedirs(os.path.join(tmp, "transformer"))
        write(tmp, {"model_index.json": "{}"})
        fd, name = tempfile.mkstemp(dir=os.path.join(tmp, "transformer"))  # mkstemp makes 0600 files
        os.close(fd)
        assert not out.exists()
    assert (out / "model_index.json").read_text() == "{}" and leftovers(tmp_path) == []
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((out / "transformer" / os.path.basename(name)).stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask  # a folder like any other, not mkdtemp's 0700


def test_atomic_folder_replaces_the_whole_checkpoint(tmp_path):
    """The bug: files moved in one by one over an older sharded save left its index and shards beside the new
    weights. Now nothing of the old checkpoint survives."""
    out = tmp_path / "out"
    write(out, OLD)
    os.chmod(out, 0o750)
    with atomic_folder(out) as tmp:
        write(tmp, NEW)
        assert tree(out) == OLD
    assert tree(out) == NEW and leftovers(tmp_path) == []
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # the folder keeps its mode


def test_atomic_folder_keeps_the_old_checkpoint_on_an_error(tmp_path):
    out = tmp_path / "out"
    write(out, OLD)
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_folder(out) as tmp:
            write(tmp, {"config.json": "half"})
            raise RuntimeError("crash")
    assert tree(out) == OLD and leftovers(tmp_path) == []


def test_atomic_folder_error_on_a_new_target_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as tmp:
            write(tmp, NEW)
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_user_files_are_carried_over_and_old_components_are_not(tmp_path):
    out = tmp_path / "out"
    index = {"_class_name": "PixArtAlphaPipeline", "_diffusers_version": "0.42.1", "transformer": ["d", "P"],
             "vae": ["d", "A"]}
    write(out, {"model_index.json": json.dumps(index), "transformer/config.json": "old", "vae/config.json": "old",
                "README.md": "my notes", "images/a.png": "png", "LICENSE": "old license", "extra.safetensors": "x",
                ".viditq-tmp-abcd1234/config.json": "leftover of an older version"})
    readme_inode = (out / "README.md").stat().st_ino
    with atomic_folder(out) as tmp:
        write(tmp, {"model_index.json": json.dumps({**index, "vae": None}), "transformer/config.json": "new",
                    "LICENSE": "new license"})
    assert tree(out) == {"model_index.json": json.dumps({**index, "vae": None}), "transformer/config.json": "new",
                         "LICENSE": "new license", "README.md": "my notes", "images/a.png": "png"}
    assert (out / "README.md").stat().st_ino == readme_inode  # hard-linked, not copied
    assert leftovers(tmp_path) == []


def test_a_foreign_folder_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "photos"
    write(out, {"cat.jpg": "meow", "settings.json": "{}", "config.json": '{"theme": "dark"}'})
    with pytest.raises(FileExistsError, match=r"photos.* is not empty \(cat\.jpg, config\.json, settings\.json\) "
                                              r"and holds no diffusers checkpoint.*pass overwrite=True"):
        with atomic_folder(out) as tmp:
            write(tmp, NEW)
    assert tree(out) == {"cat.jpg": "meow", "settings.json": "{}", "config.json": '{"theme": "dark"}'}
    with atomic_folder(out, overwrite=True) as tmp:
        write(tmp, NEW)
    assert tree(out) == {**NEW, "cat.jpg": "meow"}  # the rule: .json and weights replaced, the rest kept


def test_an_empty_folder_or_one_with_only_leftovers_is_not_foreign(tmp_path):
    (tmp_path / "empty").mkdir()
    write(tmp_path / "old-crash", {".viditq-tmp-0123abcd/config.json": "half"})
    for name in ("empty", "old-crash"):
        with atomic_folder(tmp_path / name) as tmp:
            write(tmp, NEW)
        assert tree(tmp_path / name) == NEW
    assert leftovers(tmp_path) == []


def test_a_file_target_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(NotADirectoryError, match=r"out' is a file, not a folder.*Pass a new folder path"):
        with atomic_folder(tmp_path / "out"):
            pass
    assert (tmp_path / "out").read_text() == "a file" and leftovers(tmp_path) == []


def test_a_symlinked_target_replaces_the_folder_it_points_to(tmp_path):
    write(tmp_path / "real", OLD)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with atomic_folder(tmp_path / "link") as tmp:
        write(tmp, NEW)
    assert (tmp_path / "link").is_symlink() and tree(tmp_path / "real") == NEW


def test_the_next_save_removes_leftovers_of_killed_saves_but_not_a_running_one(tmp_path):
    out = tmp_path / "out"
    write(out, OLD)
    with atomic_folder(out) as running:  # a save of the same target, still writing
        write(tmp_path, {f"{TEMP_PREFIX}{'a' * 32}-out/config.json": "killed while writing",
                         f"{OLD_PREFIX}{'b' * 32}-out/config.json": "killed after the swap, before the cleanup",
                         f"{TEMP_PREFIX}{'c' * 32}-other/config.json": "another folder's"})
        with atomic_folder(out) as tmp:
            write(tmp, NEW)
        assert os.path.isdir(running)
        write(running, NEW)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{TEMP_PREFIX}{'c' * 32}-other", "out"] and tree(out) == NEW


def test_nested_atomic_folder_writes_straight_into_the_outer_temporary(tmp_path):
    with atomic_folder(tmp_path / "pipe") as tmp:
        with atomic_folder(os.path.join(tmp, "transformer")) as inner:
            assert inner == os.path.join(tmp, "transformer")
            write(inner, NEW)
    assert tree(tmp_path / "pipe") == {f"transformer/{k}": v for k, v in NEW.items()}


def test_rename_exchange_is_available_here(tmp_path):
    """This machine (Linux, glibc >= 2.28, ext4/tmpfs) has the one-step swap; without it saves use the fallback."""
    write(tmp_path / "a", {"x": "a"})
    write(tmp_path / "b", {"x": "b"})
    atomic.exchange_folders(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


def no_exchange(a, b):
    raise OSError(errno.EINVAL, "Invalid argument", a)  # what a file system without RENAME_EXCHANGE answers


def test_fallback_without_rename_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange_folders", no_exchange)
    out = tmp_path / "out"
    write(out, OLD)
    with atomic_folder(out) as tmp:
        write(tmp, NEW)
    assert tree(out) == NEW and leftovers(tmp_path) == []


def test_fallback_error_on_the_second_rename_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange_folders", no_exchange)
    out = tmp_path / "out"
    write(out, OLD)
    real_rename = os.rename

    def rename(source, destination):
        if os.path.basename(source).startswith(TEMP_PREFIX):
            raise OSError(errno.EIO, "Input/output error", source)
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_folder(out) as tmp:
            write(tmp, NEW)
    assert tree(out) == OLD and leftovers(tmp_path) == []


def test_fallback_killed_between_the_two_renames_is_recovered(tmp_path):
    """The state a kill between the fallback's two renames leaves: no target, the old checkpoint aside, the new one
    under its temporary name. Loading (recover_folder) and the next save both bring the old one back first."""
    out = tmp_path / "out"
    write(tmp_path / f"{OLD_PREFIX}{'1' * 32}-out", OLD)
    write(tmp_path / f"{TEMP_PREFIX}{'2' * 32}-out", NEW)
    recover_folder(out)
    assert tree(out) == OLD
    os.rename(out, tmp_path / f"{OLD_PREFIX}{'1' * 32}-out")
    with atomic_folder(out) as tmp:
        write(tmp, {**NEW, "README.md": "new"})
    assert tree(out) == {**NEW, "README.md": "new"} and leftovers(tmp_path) == []


def test_recover_folder_leaves_an_existing_target_alone(tmp_path):
    write(tmp_path / "out", NEW)
    write(tmp_path / f"{OLD_PREFIX}{'1' * 32}-out", OLD)
    recover_folder(tmp_path / "out")
    assert tree(tmp_path / "out") == NEW and len(leftovers(tmp_path)) == 1  # loading never deletes


def test_a_mount_point_target_gets_a_clear_error(tmp_path, monkeypatch):
    def cross_device(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link", a)  # what a mount point as target answers

    monkeypatch.setattr(atomic, "exchange_folders", cross_device)
    write(tmp_path / "out", OLD)
    with pytest.raises(OSError, match=r"out' cannot be replaced by renaming .*mount point.*Save into a folder inside"):
        with atomic_folder(tmp_path / "out") as tmp:
            write(tmp, NEW)
    assert tree(tmp_path / "out") == OLD and leftovers(tmp_path) == []


def test_a_mount_point_is_refused_before_anything_is_written(tmp_path):
    assert os.path.ismount("/")
    with pytest.raises(OSError, match=r"'/' is a mount point.*Save into a folder inside it, e.g. '/checkpoint'"):
        with atomic_folder("/"):
            raise AssertionError("the save must not start")
