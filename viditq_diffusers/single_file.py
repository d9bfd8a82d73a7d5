"""`from_single_file` for the original key layouts diffusers cannot load by itself at every size.

diffusers loads a transformer from one file in its original layout (the files ComfyUI users and model sites carry)
through `FromOriginalModelMixin.from_single_file`, which renames the keys with a per-class conversion function and,
with a `quantization_config`, runs the quantizer's hooks as `from_pretrained` does. Two gaps are filled here:

- PixArt-α/Σ (`PixArtTransformer2DModel`) has no single-file support in diffusers: it gets the mixin's
  `from_single_file` and a conversion of the original layout (`blocks.N.attn.qkv`, `blocks.N.cross_attn.kv_linear`,
  `t_block.1`, `final_layer.*`); its `config` must be given (a diffusers model folder or hub id), as diffusers cannot
  tell PixArt-α from PixArt-Σ by the keys.
- Flux: diffusers' conversion splits `single_blocks.N.linear1` (q | k | v | MLP) at Flux.1's sizes (3072, 12288),
  so any other width (distilled or small Flux models, the tests' tiny ones) fails; here the split sizes are read
  from the file. Flux.1-sized files still go through diffusers' own function, unchanged.
"""

from __future__ import annotations

import torch

PREFIX = "model.diffusion_model."  # ComfyUI's and the original repositories' prefix for the denoiser
FLUX1_SIZES = (3072, 12288)  # (hidden, MLP hidden) diffusers' Flux conversion assumes


def strip_prefix(checkpoint: dict) -> dict:
    return {k.removeprefix(PREFIX): v for k, v in checkpoint.items()}


def _rename_all(checkpoint: dict, renames: dict[str, str], out: dict) -> None:
    """Move `old + leaf` to `new + leaf` for each (old, new) prefix pair, for every key under `old`."""
    for key in list(checkpoint):
        for old, new in renames.items():
            if key.startswith(old):
                out[new + key[len(old):]] = checkpoint.pop(key)
                break


def _split(checkpoint: dict, out: dict, source: str, targets: list[str], sizes: list[int]) -> None:
    """Split the fused layer `source` (weight, bias) along its output dim into the `targets` layers."""
    for leaf in ("weight", "bias"):
        if f"{source}.{leaf}" in checkpoint:
            for name, part in zip(targets, torch.split(checkpoint.pop(f"{source}.{leaf}"), sizes, dim=0)):
                out[f"{name}.{leaf}"] = part


def _block_indices(checkpoint: dict, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".")[0]) for k in checkpoint if k.startswith(prefix)})


def convert_pixart_checkpoint_to_diffusers(checkpoint: dict, **kwargs) -> dict:
    """PixArt-α/Σ original layout -> `PixArtTransformer2DModel` keys. The original's fixed sin-cos `pos_embed` and
    its learned null caption `y_embedder.y_embedding` (classifier-free guidance uses an empty prompt's embedding in
    diffusers) have no diffusers parameter and are dropped."""
    sd, out = strip_prefix(checkpoint), {}
    for key in ("pos_embed", "y_embedder.y_embedding"):
        sd.pop(key, None)
    for i in _block_indices(sd, "blocks."):
        b, t = f"blocks.{i}", f"transformer_blocks.{i}"
        dim = sd[f"{b}.attn.proj.weight"].shape[0]
        _split(sd, out, f"{b}.attn.qkv", [f"{t}.attn1.to_q", f"{t}.attn1.to_k", f"{t}.attn1.to_v"], [dim] * 3)
        _split(sd, out, f"{b}.cross_attn.kv_linear", [f"{t}.attn2.to_k", f"{t}.attn2.to_v"], [dim] * 2)
        _rename_all(sd, {
            f"{b}.scale_shift_table": f"{t}.scale_shift_table",
            f"{b}.attn.proj.": f"{t}.attn1.to_out.0.",
            f"{b}.attn.q_norm.": f"{t}.attn1.q_norm.",
            f"{b}.attn.k_norm.": f"{t}.attn1.k_norm.",
            f"{b}.cross_attn.q_linear.": f"{t}.attn2.to_q.",
            f"{b}.cross_attn.proj.": f"{t}.attn2.to_out.0.",
            f"{b}.mlp.fc1.": f"{t}.ff.net.0.proj.",
            f"{b}.mlp.fc2.": f"{t}.ff.net.2.",
        }, out)
    _rename_all(sd, {
        "x_embedder.proj.": "pos_embed.proj.",
        "y_embedder.y_proj.fc1.": "caption_projection.linear_1.",
        "y_embedder.y_proj.fc2.": "caption_projection.linear_2.",
        "t_embedder.mlp.0.": "adaln_single.emb.timestep_embedder.linear_1.",
        "t_embedder.mlp.2.": "adaln_single.emb.timestep_embedder.linear_2.",
        "csize_embedder.mlp.0.": "adaln_single.emb.resolution_embedder.linear_1.",
        "csize_embedder.mlp.2.": "adaln_single.emb.resolution_embedder.linear_2.",
        "ar_embedder.mlp.0.": "adaln_single.emb.aspect_ratio_embedder.linear_1.",
        "ar_embedder.mlp.2.": "adaln_single.emb.aspect_ratio_embedder.linear_2.",
        "t_block.1.": "adaln_single.linear.",
        "final_layer.linear.": "proj_out.",
        "final_layer.scale_shift_table": "scale_shift_table",
    }, out)
    if sd:
        raise ValueError(f"PixArtTransformer2DModel.from_single_file: {len(sd)} tensor(s) of the file are not part "
                         f"of the original PixArt layout (e.g. {next(iter(sd))!r}); the file holds another model "
                         f"(or a whole pipeline): pass the PixArt transformer's own file.")
    return out


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    shift, scale = t.chunk(2, dim=0)  # the original stores (shift, scale), diffusers' AdaLayerNormContinuous (scale,
    return torch.cat([scale, shift])  # shift)


def convert_flux_any_size(checkpoint: dict, **kwargs) -> dict:
    """Flux.1 original (BFL) layout -> `FluxTransformer2DModel` keys, the split sizes read from the file."""
    sd, out = strip_prefix(checkpoint), {}
    for i in _block_indices(sd, "double_blocks."):
        d, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        dim = sd[f"{d}.img_attn.proj.weight"].shape[0]
        _split(sd, out, f"{d}.img_attn.qkv", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"], [dim] * 3)
        _split(sd, out, f"{d}.txt_attn.qkv", [f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj"],
               [dim] * 3)
        _rename_all(sd, {
            f"{d}.img_mod.lin.": f"{t}.norm1.linear.",
            f"{d}.txt_mod.lin.": f"{t}.norm1_context.linear.",
            f"{d}.img_attn.norm.query_norm.scale": f"{t}.attn.norm_q.weight",
            f"{d}.img_attn.norm.key_norm.scale": f"{t}.attn.norm_k.weight",
            f"{d}.txt_attn.norm.query_norm.scale": f"{t}.attn.norm_added_q.weight",
            f"{d}.txt_attn.norm.key_norm.scale": f"{t}.attn.norm_added_k.weight",
            f"{d}.img_mlp.0.": f"{t}.ff.net.0.proj.",
            f"{d}.img_mlp.2.": f"{t}.ff.net.2.",
            f"{d}.txt_mlp.0.": f"{t}.ff_context.net.0.proj.",
            f"{d}.txt_mlp.2.": f"{t}.ff_context.net.2.",
            f"{d}.img_attn.proj.": f"{t}.attn.to_out.0.",
            f"{d}.txt_attn.proj.": f"{t}.attn.to_add_out.",
        }, out)
    for i in _block_indices(sd, "single_blocks."):
        s, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        dim = sd[f"{s}.modulation.lin.weight"].shape[1]
        mlp = sd[f"{s}.linear1.weight"].shape[0] - 3 * dim
        _split(sd, out, f"{s}.linear1", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp"],
               [dim, dim, dim, mlp])
        _rename_all(sd, {
            f"{s}.modulation.lin.": f"{t}.norm.linear.",
            f"{s}.norm.query_norm.scale": f"{t}.attn.norm_q.weight",
            f"{s}.norm.key_norm.scale": f"{t}.attn.norm_k.weight",
            f"{s}.linear2.": f"{t}.proj_out.",
        }, out)
    for leaf in ("weight", "bias"):
        out[f"norm_out.linear.{leaf}"] = _swap_halves(sd.pop(f"final_layer.adaLN_modulation.1.{leaf}"))
    _rename_all(sd, {
        "time_in.in_layer.": "time_text_embed.timestep_embedder.linear_1.",
        "time_in.out_layer.": "time_text_embed.timestep_embedder.linear_2.",
        "vector_in.in_layer.": "time_text_embed.text_embedder.linear_1.",
        "vector_in.out_layer.": "time_text_embed.text_embedder.linear_2.",
        "guidance_in.in_layer.": "time_text_embed.guidance_embedder.linear_1.",
        "guidance_in.out_layer.": "time_text_embed.guidance_embedder.linear_2.",
        "txt_in.": "context_embedder.",
        "img_in.": "x_embedder.",
        "final_layer.linear.": "proj_out.",
    }, out)
    out.update(sd)  # unknown keys stay: the loader reports them as unexpected, as diffusers' function would not
    return out


def flux_mapping(diffusers_convert):
    """The Flux conversion `from_single_file` uses: diffusers' own for Flux.1-sized files, `convert_flux_any_size`
    for every other width."""
    def convert_flux(checkpoint: dict, **kwargs) -> dict:
        linear1 = next((v for k, v in checkpoint.items() if k.endswith("single_blocks.0.linear1.weight")), None)
        if linear1 is None or tuple(linear1.shape) == (3 * FLUX1_SIZES[0] + FLUX1_SIZES[1], FLUX1_SIZES[0]):
            return diffusers_convert(checkpoint, **kwargs)
        return convert_flux_any_size(checkpoint, **kwargs)

    convert_flux.viditq_wrapped = True
    return convert_flux


def pixart_from_single_file(mixin_from_single_file):
    """`PixArtTransformer2DModel.from_single_file`: the mixin's, with `config` required."""
    def from_single_file(cls, pretrained_model_link_or_path_or_dict=None, **kwargs):
        if kwargs.get("config") is None and kwargs.get("original_config") is None:
            raise ValueError(
                f"{cls.__name__}.from_single_file needs config=: a diffusers model folder or hub id whose config "
                f"matches the file, e.g. config='PixArt-alpha/PixArt-Sigma-XL-2-1024-MS', subfolder='transformer' "
                f"(diffusers cannot tell PixArt-α from PixArt-Σ, or their resolutions, by the file's keys).")
        return mixin_from_single_file.__func__(cls, pretrained_model_link_or_path_or_dict, **kwargs)

    return classmethod(from_single_file)


def register() -> None:
    """Teach diffusers' `from_single_file` PixArt's original layout and Flux files of any width. Idempotent."""
    import diffusers
    from diffusers.loaders import single_file_model
    from diffusers.loaders.single_file_model import FromOriginalModelMixin

    classes = single_file_model.SINGLE_FILE_LOADABLE_CLASSES
    classes.setdefault("PixArtTransformer2DModel", {"checkpoint_mapping_fn": convert_pixart_checkpoint_to_diffusers,
                                                    "default_subfolder": "transformer"})
    pixart = diffusers.PixArtTransformer2DModel
    if "from_single_file" not in vars(pixart):
        pixart.from_single_file = pixart_from_single_file(vars(FromOriginalModelMixin)["from_single_file"])
    flux = classes.get("FluxTransformer2DModel")
    if flux is not None and not getattr(flux["checkpoint_mapping_fn"], "viditq_wrapped", False):
        flux["checkpoint_mapping_fn"] = flux_mapping(flux["checkpoint_mapping_fn"])
