"""LocalHub (tests/support/hub_server.py) against the real huggingface_hub client and diffusers."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from safetensors.torch import save_file

from tests.support.hub_server import LocalHub

TOKEN = "hf_local_test_token"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with LocalHub() as hub:
        hub.patch_env(monkeypatch, home=tmp_path / "hf_home")
        yield hub
        assert hub.unhandled == []  # every call the client made is implemented


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"weight": torch.randn(768, 1024)}, folder / "model.safetensors")  # ~3 MB
    (folder / "config.json").write_text(json.dumps({"hidden_size": 1024}))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny test model\n")
    return folder


def test_patch_env_points_clients_at_hub(hub):
    assert HfApi().endpoint == hub.endpoint
    assert HfApi().whoami(token=TOKEN)["name"] == "user"


def test_upload_folder_then_snapshot_download(hub, model_folder, tmp_path):
    api = HfApi()
    url = api.create_repo("user/tiny", exist_ok=True, token=TOKEN)
    assert url.repo_id == "user/tiny" and url.startswith(hub.endpoint)
    api.create_repo("user/tiny", exist_ok=True, token=TOKEN)  # 409 swallowed

    info = api.upload_folder(repo_id="user/tiny", folder_path=model_folder, commit_message="add model", token=TOKEN)
    # The .safetensors went through git-LFS (batch -> PUT -> verify), the rest inline in the NDJSON commit.
    calls = [(m, p) for m, p in hub.requests]
    assert ("POST", "/api/models/user/tiny/preupload/main") in calls
    assert ("POST", "/user/tiny.git/info/lfs/objects/batch") in calls
    assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p in calls)
    assert ("POST", "/api/models/user/tiny/commit/main") in calls
    assert not any("xet" in p for _, p in calls)
    siblings = {s.rfilename: s for s in api.model_info("user/tiny", files_metadata=True).siblings}
    assert siblings["model.safetensors"].lfs is not None and siblings["config.json"].lfs is None
    assert api.model_info("user/tiny").sha == info.oid

    local = Path(snapshot_download("user/tiny", cache_dir=tmp_path / "fresh_cache"))
    assert local.name == info.oid and local.is_relative_to(tmp_path / "fresh_cache")
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (local / name).read_bytes() == (model_folder / name).read_bytes()


def test_upload_file_and_hf_hub_download(hub, tmp_path):
    api = HfApi()
    api.create_repo("user/files", token=TOKEN)
    api.upload_file(path_or_fileobj=b'{"a": 1}', path_in_repo="sub/config.json", repo_id="user/files", token=TOKEN)
    path = hf_hub_download("user/files", "sub/config.json", cache_dir=tmp_path / "cache")
    assert open(path, "rb").read() == b'{"a": 1}'
    assert [f.path for f in api.list_repo_tree("user/files")] == ["sub"]
    assert api.list_repo_files("user/files") == ["sub/config.json"]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/files", "missing.json", cache_dir=tmp_path / "cache")


def test_missing_repo_raises_repository_not_found(hub, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/does-not-exist", "config.json", cache_dir=tmp_path / "cache")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("user/does-not-exist")


def test_upload_without_token_is_rejected(hub):
    api = HfApi()
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("user/anon", token=False)
    assert err.value.response.status_code == 401
    api.create_repo("user/anon", token=TOKEN)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/anon", token=False)
    assert err.value.response.status_code == 401
    assert "authorization" not in {k.lower() for k in err.value.response.request.headers}
    assert ("POST", "/api/models/user/anon/commit/main") not in hub.requests
    assert api.list_repo_files("user/anon") == []


def test_diffusers_from_pretrained_roundtrip(hub, tmp_path):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=2, num_attention_heads=2, in_channels=4,
        cross_attention_dim=8, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=8, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False, caption_channels=None,
    )
    model.save_pretrained(tmp_path / "tiny")
    api = HfApi()
    api.create_repo("user/tiny", token=TOKEN)
    api.upload_folder(repo_id="user/tiny", folder_path=tmp_path / "tiny", commit_message="tiny", token=TOKEN)

    hub.requests.clear()
    loaded = PixArtTransformer2DModel.from_pretrained("user/tiny")  # no endpoint/cache/token arguments
    # diffusers asks /api/models/user/tiny for the commit sha, then downloads /resolve/<sha>/... from the hub
    assert ("GET", "/api/models/user/tiny") in hub.requests
    assert any(p.endswith("/diffusion_pytorch_model.safetensors") for m, p in hub.requests if m == "GET")
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
