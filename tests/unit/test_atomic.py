"""viditq_diffusers.atomic: writes land whole under the final name or not at all, and leave no temporary behind."""

import os
import stat
import tempfile

import pytest

from viditq_diffusers.atomic import TEMP_PREFIX, atomic_folder, atomic_path


def leftovers(folder):
    return [p for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)]


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


def test_atomic_folder_moves_every_file_into_place(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        os.makedirs(os.path.join(tmp, "transformer"))
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            f.write("{}")
        fd, name = tempfile.mkstemp(dir=os.path.join(tmp, "transformer"))  # mkstemp makes 0600 files
        os.close(fd)
        assert not (out / "model_index.json").exists()
    assert (out / "model_index.json").read_text() == "{}" and leftovers(out) == []
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((out / "transformer" / os.path.basename(name)).stat().st_mode) == 0o666 & ~mask


def test_atomic_folder_keeps_the_old_files_on_an_error(tmp_path):
    (tmp_path / "config.json").write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_folder(tmp_path) as tmp:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write("half")
            raise RuntimeError("crash")
    assert (tmp_path / "config.json").read_text() == "old" and leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
