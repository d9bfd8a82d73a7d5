"""Tier 2: the pack's node classes on the trained reference PixArt, inside real ComfyUI 0.30.0 (in-process).

Under the project's venv this file has one test, which re-runs the file under ComfyUI's venv (installed on
first use by the `comfyui_install` fixture, tests/apps/conftest.py; skipped, saying why, when it cannot be).
"""

import pytest

from harness.comfyui import comfy_env

pytestmark = pytest.mark.comfyui

if not comfy_env.in_comfyui_venv():

    def test_nodes_in_comfyui_venv(comfyui_install):
        from tests.apps.comfyui.venv_tests import rerun_in_comfyui_venv

        rerun_in_comfyui_venv(__file__)

else:
    import json

    import torch

    from harness.comfyui import inprocess, reference_pixart

    torch.set_num_threads(1)
    STEPS, CFG, SEED = 12, 4.5, 0
    PROMPT = "a thick handwritten digit 7"

    def conditioning(text):
        from harness.comfyui.fixture_nodes import DigitsTextEncode

        return DigitsTextEncode().encode(text)[0]

    def empty_latent():
        return {"samples": torch.zeros(1, 4, 40, 40)}  # ComfyUI's PixArt position embedding needs >= 33 latent px

    @pytest.fixture(scope="module")
    def comfy(tmp_path_factory):
        """(pack nodes module, FP MODEL, sample(model) -> latent, base dir, calibration statistics)."""
        base = tmp_path_factory.mktemp("comfyui")
        nodes_mod = inprocess.setup(base)
        import nodes as comfy_nodes

        reference_pixart.write(str(base / "models" / "diffusion_models" / "pixart_digits_fp.safetensors"))
        fp = nodes_mod.Load.execute("pixart_digits_fp.safetensors").result[0]
        pos, neg, latent = conditioning(PROMPT), conditioning(""), empty_latent()

        def sample(model):
            out = comfy_nodes.common_ksampler(model, SEED, STEPS, CFG, "euler", "normal", pos, neg, latent)
            return out[0]["samples"]

        pos2 = conditioning("an italic handwritten digit 3")  # a list: one sample per positive
        stats = nodes_mod.Calibrate.execute([fp], [pos, pos2], [neg], [latent], [SEED], [6], [CFG], ["euler"],
                                            ["normal"]).result[0]
        assert stats.settings["num_prompts"] == 2 and stats.settings["seeds"] == [SEED, SEED + 1]
        return nodes_mod, fp, sample, base, stats

    def psnr(ref, x):
        return float(10 * torch.log10((ref.max() - ref.min()) ** 2 / ((ref - x) ** 2).mean()))

    def test_calibration_records_every_block_linear_per_timestep(comfy):
        _, _, _, _, stats = comfy
        assert stats.model_class == "PixArtMS" and len(stats.layers) == 8 * 7  # qkv, proj, q, kv, proj, fc1, fc2
        filled = stats.bucket_absmax["blocks.0.attn.qkv"].amax(1) > 0
        assert filled.sum() >= 3  # 6 steps spread over the 4 timestep buckets

    def test_quantize_is_non_destructive_and_close(comfy):
        nodes_mod, fp, sample, _, stats = comfy
        before = sample(fp)
        w8 = nodes_mod.Quantize.execute(fp, "w8a8", stats).result[0]
        quantized = sample(w8)
        after = sample(fp)  # ComfyUI unpatches lazily: the FP MODEL must get its own layers back
        assert torch.equal(before, after)
        assert 40 <= psnr(before, quantized) < 200

    def test_save_load_is_bit_identical(comfy):
        nodes_mod, fp, sample, base, stats = comfy
        w4 = nodes_mod.Quantize.execute(fp, "w4a8", stats).result[0]
        nodes_mod.Save.execute(w4, "reload_w4a8")
        path = base / "models" / "diffusion_models" / "reload_w4a8.safetensors"
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["viditq_comfyui"])
        assert meta["model_class"] == "PixArtAlpha" and meta["unet_config"]["hidden_size"] == 128
        assert len(meta["plan"]["layers"]) == 56 and meta["plan"]["model_class"] == "PixArtMS"
        reloaded = nodes_mod.Load.execute("reload_w4a8.safetensors").result[0]
        assert torch.equal(sample(w4), sample(reloaded))
        # no floating-point copy of the quantized layers: the reloaded denoiser is far smaller than the FP one
        from comfyui_nodes.patching import loaded_tree  # the shared tree as each MODEL sees it (lazy unpatching)

        size = lambda m: sum(t.numel() * t.element_size() for t in loaded_tree(m).state_dict().values())  # noqa: E731
        assert size(reloaded) < 0.35 * size(fp)

    def test_wrong_family_plan_is_refused(comfy, tmp_path):
        from viditq_diffusers.plan import PLAN_VERSION

        nodes_mod, fp, _, _, _ = comfy
        plan = {"version": PLAN_VERSION, "model_class": "FluxTransformer2DModel", "layers": {}}
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        with pytest.raises(ValueError, match="plan was made for FluxTransformer2DModel"):
            nodes_mod.Quantize.execute(fp, "w8a8", None, str(tmp_path / "plan.json"))

    def test_timestep_wise_plan_is_refused(comfy, tmp_path):
        from comfyui_nodes.patching import plan_of
        from viditq_diffusers.plan import plan_to_json

        nodes_mod, fp, _, _, _ = comfy
        plan = plan_to_json(plan_of(nodes_mod.Quantize.execute(fp, "w8a8").result[0]))
        next(iter(plan["layers"].values())).update(early_weight_bits=8, early_timestep=500.0)
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        with pytest.raises(ValueError, match="timestep-wise layer"):
            nodes_mod.Quantize.execute(fp, "w4a8", None, str(tmp_path / "plan.json"))

    def test_missing_calibration_is_named(comfy):
        nodes_mod, fp, _, _, _ = comfy
        with pytest.raises(ValueError, match="(?s)calibration.*ViDiT-Q Calibrate"):
            nodes_mod.Quantize.execute(fp, "smooth_w4a8")

    def test_corrupt_file_is_named(comfy):
        nodes_mod, _, _, base, _ = comfy
        (base / "models" / "diffusion_models" / "corrupt.safetensors").write_bytes(b"\x10\x00garbage" * 10)
        with pytest.raises(ValueError, match="corrupt.safetensors is not a readable safetensors file"):
            nodes_mod.Load.execute("corrupt.safetensors")

    def test_load_checks_quantized_tensors_and_names_the_file(comfy):
        """A saved file whose qweight was rewritten as int32: refused by ViDiT-Q Load with the file's name (it
        loaded before, ComfyUI's loader assigning tensors as they are, and failed at the first sampling step)."""
        from safetensors.torch import load_file, save_file

        nodes_mod, fp, _, base, _ = comfy
        nodes_mod.Save.execute(nodes_mod.Quantize.execute(fp, "w4a8").result[0], "edited_w4a8")
        folder = base / "models" / "diffusion_models"
        from safetensors import safe_open

        with safe_open(str(folder / "edited_w4a8.safetensors"), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(folder / "edited_w4a8.safetensors"))
        tensors["blocks.0.attn.qkv.qweight"] = tensors["blocks.0.attn.qkv.qweight"].to(torch.int32)
        save_file(tensors, str(folder / "edited_w4a8.safetensors"), metadata=metadata)
        with pytest.raises(ValueError, match=r"edited_w4a8.safetensors: tensor blocks.0.attn.qkv.qweight is int32 "
                                             r"\[384, 64\], but layer 'blocks.0.attn.qkv' \(W4A8\) stores uint8"):
            nodes_mod.Load.execute("edited_w4a8.safetensors")
        metadata["viditq_comfyui"] = metadata["viditq_comfyui"][:-1]  # cut JSON
        save_file(tensors, str(folder / "edited_w4a8.safetensors"), metadata=metadata)
        with pytest.raises(ValueError, match="edited_w4a8.safetensors: its 'viditq_comfyui' metadata is not valid"):
            nodes_mod.Load.execute("edited_w4a8.safetensors")

    def test_quantizing_twice_and_saving_fp_are_refused(comfy):
        nodes_mod, fp, _, _, _ = comfy
        w8 = nodes_mod.Quantize.execute(fp, "w8a8").result[0]
        with pytest.raises(ValueError, match="already ViDiT-Q quantized"):
            nodes_mod.Quantize.execute(w8, "w8a8")
        with pytest.raises(ValueError, match="takes a quantized MODEL"):
            nodes_mod.Save.execute(fp, "fp")

    def test_lora_on_quantized_layers_is_refused_and_lora_before_quantize_is_kept(comfy):
        nodes_mod, fp, sample, _, _ = comfy
        key = "diffusion_model.blocks.0.mlp.fc2.weight"
        delta = {key: (torch.randn(128, 512) * 0.05,)}  # a "diff" weight patch, the simplest kind LoraLoader adds
        w8 = nodes_mod.Quantize.execute(fp, "w8a8").result[0]
        lora_after = w8.clone()
        assert lora_after.add_patches(delta) == [key]
        with pytest.raises(ValueError, match="Apply the LoRA to the floating-point MODEL before ViDiT-Q Quantize"):
            sample(lora_after)
        lora_fp = fp.clone()
        lora_fp.add_patches(delta)
        lora_then_w8 = nodes_mod.Quantize.execute(lora_fp, "w8a8").result[0]
        assert psnr(sample(lora_fp), sample(lora_then_w8)) > psnr(sample(lora_fp), sample(w8)) + 5

    def test_viditq_lora_node_adds_float_branch_and_keeps_input_model(comfy):
        """ViDiT-Q LoRA on a quantized MODEL: the targeted ViDiT-Q layer computes base(x) + s * up(down(x)),
        the sample moves towards FP + the same LoRA, and the input quantized MODEL samples bit-identically."""
        import folder_paths
        import nodes as comfy_nodes
        from safetensors.torch import save_file

        from comfyui_nodes.patching import PREFIX, QuantizedLoraLinear, loaded_tree

        nodes_mod, fp, sample, base, _ = comfy
        folder_paths.add_model_folder_path("loras", str(base / "models" / "loras"), is_default=True)
        (base / "models" / "loras").mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(0)
        up, down = torch.randn(128, 4, generator=gen) * 0.3, torch.randn(4, 512, generator=gen) * 0.3
        save_file({"lora_unet_blocks_0_mlp_fc2.lora_up.weight": up, "lora_unet_blocks_0_mlp_fc2.lora_down.weight": down,
                   "lora_unet_blocks_0_mlp_fc2.alpha": torch.tensor(2.0)},
                  str(base / "models" / "loras" / "q.safetensors"))
        strength, scaling = 0.7, 0.7 * 2.0 / 4
        w8 = nodes_mod.Quantize.execute(fp, "w8a8").result[0]
        plain = sample(w8)
        with_lora = nodes_mod.Lora.execute(w8, "q.safetensors", strength).result[0]
        lora_out = sample(with_lora)
        assert torch.equal(sample(w8), plain)  # non-destructive: the input MODEL is unchanged
        assert not torch.equal(lora_out, plain)
        layer = loaded_tree(with_lora).blocks[0].mlp.fc2
        assert isinstance(layer, QuantizedLoraLinear) and layer.base is w8.object_patches[PREFIX + "blocks.0.mlp.fc2"]
        x = torch.randn(2, 7, 512, generator=gen)
        with torch.no_grad():
            expected = layer.base(x) + scaling * (x @ down.T @ up.T)
            assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-4)
        loaded_tree(fp)  # the stock loader's key map reads the shared tree: give it the FP layers (lazy unpatching)
        fp_lora = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(fp, "q.safetensors", strength)[0]
        ref = sample(fp_lora)
        assert psnr(ref, lora_out) > psnr(ref, plain) + 5
        # diffusers/PEFT keys: to_k of attn1 lands on rows 128:256 of ComfyUI's fused, quantized qkv
        up_k, down_k = torch.randn(128, 2, generator=gen) * 0.3, torch.randn(2, 128, generator=gen) * 0.3
        save_file({"transformer.transformer_blocks.0.attn1.to_k.lora_B.weight": up_k,
                   "transformer.transformer_blocks.0.attn1.to_k.lora_A.weight": down_k},
                  str(base / "models" / "loras" / "k.safetensors"))
        qkv_lora = nodes_mod.Lora.execute(w8, "k.safetensors", 1.0).result[0]
        qkv = loaded_tree(qkv_lora).blocks[0].attn.qkv
        assert isinstance(qkv, QuantizedLoraLinear)
        x = torch.randn(2, 7, 128, generator=gen)
        with torch.no_grad():
            delta = qkv(x) - qkv.base(x)
        assert torch.allclose(delta[..., 128:256], x @ down_k.T @ up_k.T, atol=1e-4, rtol=1e-4)
        assert delta[..., :128].abs().max() == 0 and delta[..., 256:].abs().max() == 0
        # the stock loader on a quantized MODEL still refuses, and names the new node
        loaded_tree(w8)
        stock = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(w8, "q.safetensors", strength)[0]
        with pytest.raises(ValueError, match="ViDiT-Q LoRA node"):
            sample(stock)

    @pytest.mark.parametrize("family, layers", [("flux", 12), ("sd3", 13), ("wan", 20)])
    def test_other_families_quantize_save_and_reload(comfy, family, layers):
        """Tiny random Flux / SD3 / Wan 2.1 built by ComfyUI's own classes: the same path as PixArt."""
        import nodes as comfy_nodes  # ComfyUI is set up by the `comfy` fixture

        from tests.apps.comfyui import tiny_models

        nodes_mod, _, _, base, _ = comfy
        tiny_models.write(family, str(base / "models" / "diffusion_models" / f"{family}.safetensors"))
        fp = nodes_mod.Load.execute(f"{family}.safetensors").result[0]
        pos, neg = tiny_models.conditioning(family, 1), tiny_models.conditioning(family, 2)
        latent = {"samples": torch.zeros(tiny_models.LATENTS[family])}

        def sample(model):
            return comfy_nodes.common_ksampler(model, SEED, 6, 3.0, "euler", "simple", pos, neg, latent)[0]["samples"]

        stats = nodes_mod.Calibrate.execute([fp], [pos], [neg], [latent], [SEED], [8], [3.0], ["euler"],
                                            ["simple"]).result[0]
        assert len(stats.layers) == layers
        first = stats.layers[0]  # buckets span the trajectory, also for Flux's [0, 1] timesteps (Wan: shift 8)
        assert (stats.bucket_absmax[first].amax(1) > 0).sum() >= 2
        before = sample(fp)
        w8 = nodes_mod.Quantize.execute(fp, "w8a8", stats).result[0]
        w4 = nodes_mod.Quantize.execute(fp, "w4a8", stats).result[0]
        w8_out, w4_out = sample(w8), sample(w4)
        assert torch.equal(before, sample(fp))
        assert psnr(before, w8_out) >= 45 and psnr(before, w4_out) >= 30
        nodes_mod.Save.execute(w4, f"{family}_w4a8")
        assert torch.equal(w4_out, sample(nodes_mod.Load.execute(f"{family}_w4a8.safetensors").result[0]))

    @pytest.mark.parametrize("dtype, manual_cast, min_db", [
        # measured (calibrated W8A8 vs the same MODEL's FP sample; fp32 gets 54 dB on the server):
        (torch.bfloat16, torch.float32, 45),  # ComfyUI's CPU path for bf16 weights (fp32 manual cast): 56.1 dB
        # the GPU path, bf16 compute: bf16 rounding alone puts the bf16 FP sample 46 dB from fp32; 47.7 dB
        (torch.bfloat16, None, 42),
        (torch.float16, None, 45),  # fp16 compute: 54.1 dB
    ])
    def test_half_precision_model_quantizes_close_to_its_own_fp(comfy, dtype, manual_cast, min_db):
        """A MODEL with bf16 / fp16 weights (ComfyUI's weight dtype and manual cast): calibrate, quantize
        W8A8, sample; finite, close to the same MODEL's FP sample, which stays bit-identical."""
        from comfy.model_management import unet_manual_cast

        from comfyui_nodes.patching import loaded_tree
        from viditq_diffusers import ViDiTQLinear

        nodes_mod, _, sample, _, _ = comfy
        if manual_cast is not None:
            assert unet_manual_cast(dtype, torch.device("cpu")) == manual_cast
        fp = reference_pixart.patcher(dtype, manual_cast)
        assert fp.model.get_dtype() == dtype and fp.model.manual_cast_dtype == manual_cast
        stats = nodes_mod.Calibrate.execute([fp], [conditioning(PROMPT)], [conditioning("")], [empty_latent()],
                                            [SEED], [6], [CFG], ["euler"], ["normal"]).result[0]
        ref = sample(fp)
        w8 = nodes_mod.Quantize.execute(fp, "w8a8", stats).result[0]
        out = sample(w8)
        assert isinstance(loaded_tree(w8).blocks[0].attn.qkv, ViDiTQLinear)
        print(f"{dtype} (manual cast {manual_cast}): W8A8 vs FP {psnr(ref, out):.2f} dB")
        assert torch.isfinite(out).all() and not torch.equal(ref, out)
        assert psnr(ref, out) >= min_db
        assert torch.equal(ref, sample(fp))
        if manual_cast is not None:  # ViDiT-Q Load picks ComfyUI's manual cast for the file's dtype: this one
            name = f"half_{str(dtype).removeprefix('torch.')}"
            nodes_mod.Save.execute(w8, name)
            reloaded = nodes_mod.Load.execute(f"{name}.safetensors").result[0]
            assert reloaded.model.get_dtype() == dtype and torch.equal(out, sample(reloaded))

    def test_float8_weights_are_refused_by_name(comfy):
        nodes_mod = comfy[0]
        fp8 = reference_pixart.patcher(torch.float8_e4m3fn, torch.float32)  # Load Diffusion Model, fp8_e4m3fn
        with pytest.raises(ValueError, match="stores its weights as float8_e4m3fn.*weight_dtype 'default'"):
            nodes_mod.Quantize.execute(fp8, "w8a8")

    def test_family_outside_the_supported_list_is_refused_by_name(comfy):
        """LTX-Video (ComfyUI's LTXV, built empty on the meta device): not in the pack's checked families."""
        from comfy.model_patcher import ModelPatcher
        from comfy.supported_models import LTXV

        nodes_mod = comfy[0]
        config = {"image_model": "ltxv", "num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2,
                  "cross_attention_dim": 16, "caption_channels": 16, "in_channels": 16}
        model_config = LTXV(config)
        model_config.set_inference_dtype(torch.float32, None)
        cpu = torch.device("cpu")
        ltxv = ModelPatcher(model_config.get_model({}, "", device="meta"), cpu, cpu)
        with pytest.raises(ValueError, match=r"presets support PixArt .*this MODEL's denoiser is LTXVModel \(LTXV\)"):
            nodes_mod.Quantize.execute(ltxv, "w8a8")
