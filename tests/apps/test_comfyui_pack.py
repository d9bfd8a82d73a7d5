"""Tier 1: the ComfyUI pack's packaging, without ComfyUI (its import guard, metadata, the core's independence)."""

import importlib
import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_pack_imports_outside_comfyui():
    assert importlib.util.find_spec("comfy") is None  # this is the project's venv, not ComfyUI's
    sys.path.insert(0, str(REPO))
    pack = importlib.import_module("comfyui_nodes")
    assert not hasattr(pack, "comfy_entrypoint")  # the guard: no nodes without ComfyUI


def test_pack_metadata():
    meta = tomllib.loads((REPO / "comfyui_nodes" / "pyproject.toml").read_text())
    assert {"PublisherId", "DisplayName"} <= set(meta["tool"]["comfy"])
    requirements = (REPO / "comfyui_nodes" / "requirements.txt").read_text()
    assert re.search(r"^viditq-diffusers", requirements, re.M)


def test_core_never_imports_comfy():
    pattern = re.compile(r"^\s*(import|from)\s+(comfy|comfy_api|folder_paths|nodes)\b", re.M)
    offenders = [str(p) for p in (REPO / "viditq_diffusers").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_readme_lists_exactly_the_families_quantize_accepts():
    """The pack's README table of model families and `families.FAMILIES` (what ViDiT-Q Quantize's presets
    accept) name the same ComfyUI classes and families."""
    sys.path.insert(0, str(REPO))
    from comfyui_nodes.families import FAMILIES, check_family

    readme = (REPO / "comfyui_nodes" / "README.md").read_text()
    section = readme.split("\n## Model families\n")[1].split("\n## ")[0]
    rows = re.findall(r"^\| ([^|]+?) \| `(\w+)`", section, re.M)
    assert {cls: family for family, cls in rows} == FAMILIES
    check_family("WanModel", "WAN21", has_plan=False)
    check_family("LTXVModel", "LTXV", has_plan=True)  # a plan names its layers itself
    with pytest.raises(ValueError, match=r"presets support PixArt .*Wan 2\.1 \(WanModel\); this MODEL's denoiser "
                                         r"is LTXVModel \(LTXV\)"):
        check_family("LTXVModel", "LTXV", has_plan=False)
