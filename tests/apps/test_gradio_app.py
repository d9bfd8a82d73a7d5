"""The Gradio demo (gradio_app/): its variant logic in-process, then the real app in headless Chromium.

The browser tests start `python -m gradio_app` on 127.0.0.1 (a free port) with the Hub pointed at the
in-process LocalHub (tests/support/hub_server.py), and drive the page with Playwright in headless Chromium (found
or installed once per session by the `chromium_path` fixture, tests/apps/conftest.py)."""

from __future__ import annotations

import io
import json
import re
import threading
from pathlib import Path
from urllib.parse import urljoin

import pytest
import torch

from gradio_app import inputs, variants
from gradio_app.choices import BUNDLED, CUSTOM, DEFAULT_SOURCE, ENCODER_CHECKBOX
from harness.browser import launch_chromium
from harness.gradio_ui.server import AppServer
from tests.support.hub_server import LocalHub

PIXART = BUNDLED[DEFAULT_SOURCE]
TIMEOUT_MS = 180_000  # one generation is a few seconds; a cold first one on a busy CPU takes longer


def unet_pipeline(path: Path) -> Path:
    """A tiny real DDPMPipeline (UNet2DModel denoiser): a pipeline class the core does not quantize."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------- variant logic


def test_requests_are_validated_with_messages_that_say_the_fix(tmp_path):
    for args, message in [(("", 20, 4.5, 0), "prompt is empty"), (("  ", 20, 4.5, 0), "prompt is empty"),
                          (("a digit", 0, 4.5, 0), "Steps must be a whole number from 2 to 100"),
                          (("a digit", 101, 4.5, 0), "(got 101)"), (("a digit", 2.5, 4.5, 0), "(got 2.5)"),
                          (("a digit", 20, -1, 0), "Guidance must be a number from 0 to 30"),
                          (("a digit", 20, 4.5, -3), "seed must be a whole number")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            inputs.generation(*args)
    assert inputs.generation("a digit", 20.0, 4, 7.0) == ("a digit", 20, 4.0, 7)

    assert variants.resolve_source(DEFAULT_SOURCE) == PIXART
    assert variants.resolve_source(CUSTOM, " owner/model-name ") == "owner/model-name"
    assert variants.resolve_source(CUSTOM, PIXART) == PIXART
    (tmp_path / "notes.txt").write_text("not a pipeline")
    for custom, message in [("", "No pipeline given"), (str(tmp_path), "has no model_index.json"),
                            ("no/such/dir/here", "neither an existing directory nor a Hub id")]:
        with pytest.raises(ValueError, match=message):
            variants.resolve_source(CUSTOM, custom)
    unet = unet_pipeline(tmp_path / "ddpm")
    with pytest.raises(ValueError, match=r"its denoiser is UNet2DModel.*PixArtTransformer2DModel"):
        variants.LoadedPipeline(str(unet))


def test_video_results_are_gifs_and_old_ones_are_deleted():
    import os
    import time

    from gradio_app import app as ui

    stale = os.path.join(ui.OUTPUT_DIR, "stale.gif")
    open(stale, "wb").close()
    os.utime(stale, (time.time() - ui.OUTPUT_MAX_AGE_S - 60,) * 2)
    fresh = ui.to_display(torch.zeros(1, 3, 1, 8, 8))  # [batch, frames, channels, height, width]
    assert os.path.exists(fresh) and fresh.endswith(".gif") and not os.path.exists(stale)
    assert os.path.exists(ui.to_display(torch.zeros(1, 3, 1, 8, 8))) and os.path.exists(fresh)  # recent ones stay


def test_variants_are_built_once_shared_read_only_and_deterministic():
    torch.set_num_threads(1)
    loaded = variants.LoadedPipeline(PIXART)
    label, w8 = loaded.variant("W8A8")
    assert loaded.variant("W8A8")[1] is w8  # not re-quantized per request
    mp_label, mp = loaded.variant("W4A8-MP")
    assert "shipped searched plan" in mp_label
    assert {spec.weight_bits for spec in mp.config.quantization_config.plan["layers"].values()} == {4, 8}
    assert not any(isinstance(m, variants.ViDiTQLinear) for m in loaded.fp.transformer.modules())  # FP untouched

    call = ("a thick handwritten digit 7", "", 3, 8, 4.5)
    first = loaded.generate(*call)
    assert [r.label for r in first] == ["FP32 (CPU)", label, mp_label]
    fp, r8, rmp = first
    assert fp.weight_bytes > r8.weight_bytes > rmp.weight_bytes
    assert fp.component_bytes["transformer"] > 3 * r8.component_bytes["transformer"]
    assert r8.psnr > 40 and rmp.psnr > 30 and 0.95 < rmp.ssim <= r8.ssim < 1, (r8.psnr, rmp.psnr)
    assert all(r.latency_s > 0 and r.peak_bytes > 100 * 2**20 for r in first)

    # Two requests at once on the shared models give what each gives alone.
    other = ("a thin handwritten digit 3", "", 4, 8, 4.5)
    alone = loaded.generate(*other)
    together = {}
    threads = [threading.Thread(target=lambda k, c: together.__setitem__(k, loaded.generate(*c)), args=(k, c))
               for k, c in (("first", call), ("other", other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # The quantized variants (integer GEMMs) give the same bits; FP32 may round differently in the last place,
    # since CPU BLAS picks kernels by the activations' memory alignment, which concurrent allocations shift.
    for expected, got in ((first, together["first"]), (alone, together["other"])):
        assert (got[0].samples - expected[0].samples).abs().max() < 1e-4
        assert all(torch.equal(e.samples, g.samples) for e, g in zip(expected[1:], got[1:]))
    assert not torch.equal(first[0].samples, alone[0].samples)
    assert loaded.variant("W8A8")[1] is w8 and loaded.variant("W4A8-MP")[1] is mp


def test_the_text_encoder_checkbox_runs_w8a16_encoders_and_the_weights_count_the_whole_pipeline():
    """With the checkbox, W8A8 and W4A8-MP run a text encoder loaded W8A16 (once, shared), FP stays FP, and each
    result's weights are the sum of its pipeline's components as stored; ignoring the box fails every check below."""
    from viditq_diffusers import weight_bytes

    torch.set_num_threads(1)
    loaded = variants.LoadedPipeline(PIXART)
    call = ("a thick handwritten digit 7", "", 3, 4, 4.5)
    plain = loaded.generate(*call)
    assert loaded.quantized_encoders is None  # unchecked: nothing extra loads
    both = loaded.generate(*call, quantize_encoder=True)
    encoder = loaded.encoders()["text_encoder"]
    assert type(encoder).__name__ == "T5EncoderModel" and encoder is not loaded.fp.text_encoder
    layers = [m for m in encoder.modules() if isinstance(m, variants.ViDiTQLinear)]
    block_linears = [n for n, m in loaded.fp.text_encoder.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.startswith("encoder.block.")]
    assert len(layers) == len(block_linears) > 0 and {(m.weight_bits, m.act_bits) for m in layers} == {(8, 16)}
    assert not any(isinstance(m, variants.ViDiTQLinear) for m in loaded.fp.text_encoder.modules())  # FP untouched

    assert torch.equal(both[0].samples, plain[0].samples) and both[0].label == plain[0].label  # FP stays FP
    vae, fp_encoder = weight_bytes(loaded.fp.vae), weight_bytes(loaded.fp.text_encoder)
    assert plain[0].component_bytes == {"transformer": weight_bytes(loaded.fp.transformer), "text_encoder": fp_encoder,
                                        "vae": vae} == both[0].component_bytes
    for name, p, b in zip(variants.VARIANTS[1:], plain[1:], both[1:]):
        transformer = weight_bytes(loaded.variant(name)[1])
        assert p.label + " + text encoder W8A16" == b.label
        assert p.component_bytes == {"transformer": transformer, "text_encoder": fp_encoder, "vae": vae}
        assert b.component_bytes == {"transformer": transformer, "text_encoder": weight_bytes(encoder), "vae": vae}
        assert b.weight_bytes == transformer + weight_bytes(encoder) + vae < p.weight_bytes
        assert weight_bytes(encoder) < 0.6 * fp_encoder  # int8 linears, FP32 embeddings and norms
        assert not torch.equal(b.samples, p.samples) and b.psnr > 20  # the quantized encoder ran, close to FP
    again = loaded.generate(*call, quantize_encoder=True)
    assert loaded.encoders()["text_encoder"] is encoder  # loaded once per pipeline, not per request
    assert all(torch.equal(a.samples, b.samples) for a, b in zip(again[1:], both[1:]))


# ----------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def hub():
    with LocalHub() as hub:
        yield hub


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    return tmp_path_factory.mktemp("saves")  # the app's --output-dir


@pytest.fixture(scope="module")
def app(hub, saves, tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
           "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_TOKEN_PATH": str(home / "token")}
    server = AppServer(tmp_path_factory.mktemp("app") / "app.log", env=env, args=("--output-dir", str(saves))).start()
    try:
        server.wait_for_log("models ready")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p, chromium_path)
        yield browser
        browser.close()


def open_page(browser, app):
    page = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
    page.goto(app.url, wait_until="networkidle")
    return page


def submit(page, prompt: str, seed: int, steps: int = 20):
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Seed").fill(str(seed))
    page.get_by_label("Steps (2-100)").fill(str(steps))
    page.click("#generate")


def wait_for_result(page, prompt: str, seed: int, rgb: bool = True) -> dict:
    """The status names this request; returns {variant: (label, metrics text, image: RGB pixels or as served)}."""
    from PIL import Image
    from playwright.sync_api import expect

    expect(page.locator("#status")).to_contain_text(f"“{prompt}” (seed {seed},", timeout=TIMEOUT_MS)
    out = {}
    for name in variants.VARIANTS:
        image = page.locator(f"#image-{name} img")
        expect(image).to_be_visible(timeout=TIMEOUT_MS)
        page.wait_for_function(f"document.querySelector('#image-{name} img').naturalWidth > 0")
        data = page.request.get(urljoin(page.url, image.get_attribute("src"))).body()
        label = page.locator(f"#image-{name} [data-testid='block-label']").inner_text()
        image = Image.open(io.BytesIO(data))
        out[name] = (label, page.inner_text(f"#metrics-{name}"), image.convert("RGB") if rgb else image)
    return out


def number(text: str, row: str) -> float:
    return float(re.search(rf"{re.escape(row)}\s+([\d.]+)", text).group(1))


def parts(text: str) -> dict[str, float]:
    """The "weights by component" row: {component: MiB}."""
    row = re.search(r"weights by component\s+(.*) MiB", text).group(1)
    return {name: float(size) for name, size in (part.split(" ") for part in row.split(" · "))}


@pytest.mark.browser
def test_generate_shows_three_images_with_their_metrics(browser, app):
    page = open_page(browser, app)
    submit(page, "a thick handwritten digit 7", 1)
    result = wait_for_result(page, "a thick handwritten digit 7", 1)
    assert [label for label, _, _ in result.values()] == [
        "FP32 (CPU)", "W8A8 (paper recipe, alpha 0.75, shipped calibration)",
        "W4A8-MP (shipped searched plan, <= 5 avg. weight bits)"]
    for label, metrics, image in result.values():
        assert image.size == (256, 256) and max(image.convert("L").getextrema()) > 128  # a drawn digit, upscaled
        assert number(metrics, "latency") > 0 and number(metrics, "peak memory") > 100
        assert label in metrics
    fp, w8, mp = (metrics for _, metrics, _ in result.values())
    assert "PSNR vs FP\treference" in fp
    assert number(w8, "PSNR vs FP") > 40 and number(mp, "PSNR vs FP") > 30
    assert 0.95 < number(mp, "SSIM vs FP") <= number(w8, "SSIM vs FP") <= 1
    weights = [parts(text) for text in (fp, w8, mp)]
    assert weights[0]["transformer"] > 3 * weights[1]["transformer"] > 3 * weights[2]["transformer"]
    assert all(set(w) == {"transformer", "text_encoder", "vae"} for w in weights)
    for text, w in zip((fp, w8, mp), weights):  # the whole pipeline: the sum of its components
        assert abs(number(text, "weights (whole pipeline)") - sum(w.values())) < 0.015
    assert number(w8, "weights (whole pipeline)") < 0.5 * number(fp, "weights (whole pipeline)")
    page.context.close()


@pytest.mark.browser
def test_the_text_encoder_checkbox_shrinks_the_whole_pipeline(browser, app):
    """Checked, the quantized variants say so and weigh less by their text encoder's share; FP is unchanged."""
    page = open_page(browser, app)
    submit(page, "a thin handwritten digit 3", 4, steps=10)
    plain = wait_for_result(page, "a thin handwritten digit 3", 4)
    page.get_by_label(ENCODER_CHECKBOX).check()
    submit(page, "a thin handwritten digit 3", 4, steps=10)
    page.wait_for_function("document.querySelector('#status').innerText.includes('W8A16 text encoder')",
                           timeout=TIMEOUT_MS)
    both = wait_for_result(page, "a thin handwritten digit 3", 4)
    assert both["FP"][0] == plain["FP"][0] == "FP32 (CPU)" and parts(both["FP"][1]) == parts(plain["FP"][1])
    for name in variants.VARIANTS[1:]:
        assert both[name][0] == plain[name][0] + " + text encoder W8A16"
        p, b = parts(plain[name][1]), parts(both[name][1])
        assert b["transformer"] == p["transformer"] and b["vae"] == p["vae"]
        assert b["text_encoder"] < 0.6 * p["text_encoder"]
        assert number(both[name][1], "weights (whole pipeline)") < number(plain[name][1], "weights (whole pipeline)")
        assert number(both[name][1], "PSNR vs FP") > 20
    page.get_by_label(ENCODER_CHECKBOX).uncheck()  # and back: the plain variants again, same pixels
    submit(page, "a thin handwritten digit 3", 4, steps=10)
    page.wait_for_function("!document.querySelector('#status').innerText.includes('W8A16 text encoder')",
                           timeout=TIMEOUT_MS)
    again = wait_for_result(page, "a thin handwritten digit 3", 4)
    assert [label for label, _, _ in again.values()] == [label for label, _, _ in plain.values()]
    page.context.close()


@pytest.mark.browser
def test_bundled_video_pipeline_shows_three_animations(browser, app):
    page = open_page(browser, app)
    page.get_by_role("radio", name="bundled video: latte_digits").check()
    submit(page, "a handwritten digit 4 moving right", 3, steps=10)
    result = wait_for_result(page, "a handwritten digit 4 moving right", 3, rgb=False)
    assert [label.split(" ")[0] for label, _, _ in result.values()] == ["FP32", "W8A8", "W4A8-MP"]
    assert "shipped searched plan" in result["W4A8-MP"][0]  # latte_digits ships its plan too
    for _, metrics, image in result.values():
        assert image.format == "GIF" and image.n_frames == 8 and image.size == (256, 256)
    assert number(result["W8A8"][1], "PSNR vs FP") > 35 and number(result["W4A8-MP"][1], "PSNR vs FP") > 25
    page.context.close()


@pytest.mark.browser
def test_bad_inputs_show_the_error_and_the_app_keeps_serving(browser, app, tmp_path):
    from playwright.sync_api import expect

    page = open_page(browser, app)
    unet = unet_pipeline(tmp_path / "ddpm")
    (tmp_path / "empty").mkdir()

    def shows(message):
        expect(page.get_by_text(message).first).to_be_visible(timeout=60_000)

    submit(page, "", 0)
    shows("The prompt is empty")
    submit(page, "a handwritten digit 1", 0, steps=500)
    shows("Steps must be a whole number from 2 to 100 (got 500)")
    page.get_by_role("radio", name=CUSTOM).check()
    page.locator("#custom-source textarea, #custom-source input").first.fill(str(tmp_path / "empty"))
    submit(page, "a handwritten digit 1", 0)
    shows("is not a diffusers pipeline directory (it has no model_index.json)")
    page.locator("#custom-source textarea, #custom-source input").first.fill(str(unet))
    submit(page, "a handwritten digit 1", 0)
    shows("its denoiser is UNet2DModel (component 'unet'), and ViDiT-Q quantizes diffusion transformers")

    page.get_by_role("radio", name=DEFAULT_SOURCE).check()
    submit(page, "a handwritten digit 1", 5)
    result = wait_for_result(page, "a handwritten digit 1", 5)
    assert number(result["W8A8"][1], "PSNR vs FP") > 40
    page.context.close()


@pytest.mark.browser
def test_two_concurrent_sessions_both_get_their_own_results(browser, app):
    from PIL import ImageChops

    a, b = open_page(browser, app), open_page(browser, app)
    requests = {"a": ("a thin handwritten digit 3", 11), "b": ("an italic handwritten digit 5", 12)}
    submit(a, *requests["a"])
    submit(b, *requests["b"])
    together = {"a": wait_for_result(a, *requests["a"]), "b": wait_for_result(b, *requests["b"])}
    # Each request again, alone and in the other session: the same pixels (FP32 to one level of 255: its last
    # bits may round differently, see the in-process test), so neither run disturbed the other.
    for page, key in ((a, "b"), (b, "a")):
        submit(page, *requests[key])
        alone = wait_for_result(page, *requests[key])
        for name in variants.VARIANTS:
            diff = ImageChops.difference(alone[name][2], together[key][name][2]).getextrema()
            assert max(hi for _, hi in diff) <= 1, (key, name, diff)
    diff = ImageChops.difference(together["a"]["FP"][2], together["b"]["FP"][2]).getextrema()
    assert max(hi for _, hi in diff) > 64  # a 3 and a 5
    a.context.close()
    b.context.close()


@pytest.mark.browser
def test_hub_pipeline_calibrate_save_and_push(browser, app, hub, saves, tmp_path, monkeypatch):
    """A Hub id as the pipeline (no shipped statistics): Calibrate, generate, save W4A8-MP, push W8A8."""
    from playwright.sync_api import expect
    from viditq_diffusers.checkpoint import checkpoint_summary

    hub.patch_env(monkeypatch)  # this process uploads the FP pipeline and reads the pushed one (no Xet)
    api = hub.api(token="hf_local")
    api.create_repo("user/pixart-digits", exist_ok=True)
    api.upload_folder(repo_id="user/pixart-digits", folder_path=PIXART,
                      ignore_patterns=["viditq_plans/*", "*.png", "README.md"])
    page = open_page(browser, app)
    page.get_by_role("radio", name=CUSTOM).check()
    page.locator("#custom-source textarea, #custom-source input").first.fill("user/pixart-digits")
    page.get_by_label("Steps (2-100)").fill("10")
    page.get_by_text("Calibrate (pipelines without shipped statistics)").click()
    page.click("#calibrate")
    # gr.Progress follows the core's tqdm bar while the statistics are recorded
    expect(page.locator("#calibrate-status")).to_contain_text("viditq calibrate", timeout=TIMEOUT_MS)
    expect(page.locator("#calibrate-status")).to_contain_text("Calibrated", timeout=TIMEOUT_MS)
    assert "5 prompts x 10 steps" in page.inner_text("#calibrate-status")

    submit(page, "a faint handwritten digit 0", 2, steps=10)
    result = wait_for_result(page, "a faint handwritten digit 0", 2)
    assert result["W4A8-MP"][0] == "W4A8-MP (preset w4a8_mp, calibrated)"
    assert result["W8A8"][0] == "W8A8 (preset w8a8, calibrated)"
    assert number(result["W4A8-MP"][1], "PSNR vs FP") > 25

    page.get_by_text("Save or push a quantized variant").click()
    page.get_by_role("radio", name="W4A8-MP", exact=True).check()
    directory = page.locator("#save-directory textarea, #save-directory input").first  # its label has the root
    directory.fill(str(tmp_path / "saved"))  # outside --output-dir: refused
    page.click("#save")
    expect(page.get_by_text("this app saves only inside its output folder").first).to_be_visible(timeout=60_000)
    directory.fill("saved")
    page.click("#save")
    expect(page.locator("#store-status")).to_contain_text("Saved the W4A8-MP pipeline", timeout=TIMEOUT_MS)
    assert not (tmp_path / "saved").exists()
    saved = checkpoint_summary(str(saves / "saved"))["transformer"]
    assert saved["model_class"] == "PixArtTransformer2DModel" and {"W4A8", "W8A8"} <= set(saved["formats"]), saved

    page.get_by_role("radio", name="W8A8", exact=True).check()
    page.get_by_label("Hub repo id", exact=True).fill("user/pixart-digits-w8a8")
    page.get_by_label("Hub token", exact=True).fill("hf_local")
    page.click("#push")
    expect(page.locator("#store-status")).to_contain_text("Pushed the W8A8 pipeline", timeout=TIMEOUT_MS)
    files = set(api.list_repo_files("user/pixart-digits-w8a8"))
    assert {"README.md", "model_index.json", "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors", "vae/config.json"} <= files, files
    config = json.loads(open(api.hf_hub_download("user/pixart-digits-w8a8", "transformer/config.json",
                                                 cache_dir=tmp_path / "dl")).read())
    assert config["quantization_config"]["quant_method"] == "viditq"
    assert {spec["weight_bits"] for spec in config["quantization_config"]["plan"]["layers"].values()} == {8}
    card = open(api.hf_hub_download("user/pixart-digits-w8a8", "README.md", cache_dir=tmp_path / "dl")).read()
    assert "ViDiT-Q" in card and "user/pixart-digits-w8a8" in card
    page.context.close()
