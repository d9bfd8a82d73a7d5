"""Diffusers state dicts written back in the models' original key layouts (the single files ComfyUI users and model
sites carry), for the `from_single_file` tests.

Each `to_original_<family>` is the inverse of the key conversion that loads such a file (diffusers'
`convert_*_checkpoint_to_diffusers` for SD3, Flux and Wan; `viditq_diffusers.single_file` for PixArt and Flux at any
size), written independently of it: fused projections are concatenated again, renamed keys get their original names,
and the scale/shift halves diffusers swaps are swapped back. A diffusers key that no rule maps raises, so a model
feature these functions do not know fails the test instead of being dropped.
"""

from __future__ import annotations

import re

import torch


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) along dim 0: diffusers' adaLN-continuous order differs from the original."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first]).contiguous()


def _fuse(sd: dict, out: dict, parts: list[str], target: str) -> None:
    """Concatenate the `parts` layers (weight and bias) into `target` along the output dim."""
    for leaf in ("weight", "bias"):
        if f"{parts[0]}.{leaf}" in sd:
            out[f"{target}.{leaf}"] = torch.cat([sd.pop(f"{p}.{leaf}") for p in parts]).contiguous()


def _rename(sd: dict, out: dict, rules: list[tuple[str, str]]) -> None:
    """Move every remaining key through the first regex rule that matches it in full; raise on a key none maps."""
    for key in list(sd):
        for pattern, repl in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = sd.pop(key).contiguous()
                break
        else:
            raise KeyError(f"no original-layout name for diffusers key {key!r}")


def to_original_pixart(state_dict: dict) -> dict:
    """PixArt-α/Σ (`blocks.N.attn.qkv`, `blocks.N.cross_attn.kv_linear`, `t_block.1`, ...)."""
    sd, out = dict(state_dict), {}
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in blocks:
        b = f"transformer_blocks.{i}"
        _fuse(sd, out, [f"{b}.attn1.to_q", f"{b}.attn1.to_k", f"{b}.attn1.to_v"], f"blocks.{i}.attn.qkv")
        _fuse(sd, out, [f"{b}.attn2.to_k", f"{b}.attn2.to_v"], f"blocks.{i}.cross_attn.kv_linear")
    _rename(sd, out, [
        (r"pos_embed\.proj\.(\w+)", r"x_embedder.proj.\1"),
        (r"caption_projection\.linear_1\.(\w+)", r"y_embedder.y_proj.fc1.\1"),
        (r"caption_projection\.linear_2\.(\w+)", r"y_embedder.y_proj.fc2.\1"),
        (r"adaln_single\.emb\.timestep_embedder\.linear_1\.(\w+)", r"t_embedder.mlp.0.\1"),
        (r"adaln_single\.emb\.timestep_embedder\.linear_2\.(\w+)", r"t_embedder.mlp.2.\1"),
        (r"adaln_single\.emb\.resolution_embedder\.linear_1\.(\w+)", r"csize_embedder.mlp.0.\1"),
        (r"adaln_single\.emb\.resolution_embedder\.linear_2\.(\w+)", r"csize_embedder.mlp.2.\1"),
        (r"adaln_single\.emb\.aspect_ratio_embedder\.linear_1\.(\w+)", r"ar_embedder.mlp.0.\1"),
        (r"adaln_single\.emb\.aspect_ratio_embedder\.linear_2\.(\w+)", r"ar_embedder.mlp.2.\1"),
        (r"adaln_single\.linear\.(\w+)", r"t_block.1.\1"),
        (r"transformer_blocks\.(\d+)\.scale_shift_table", r"blocks.\1.scale_shift_table"),
        (r"transformer_blocks\.(\d+)\.attn1\.to_out\.0\.(\w+)", r"blocks.\1.attn.proj.\2"),
        (r"transformer_blocks\.(\d+)\.attn2\.to_q\.(\w+)", r"blocks.\1.cross_attn.q_linear.\2"),
        (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0\.(\w+)", r"blocks.\1.cross_attn.proj.\2"),
        (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
        (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
        (r"proj_out\.(\w+)", r"final_layer.linear.\1"),
        (r"scale_shift_table", r"final_layer.scale_shift_table"),
    ])
    return out


def to_original_sd3(state_dict: dict) -> dict:
    """SD3 / SD3.5 MMDiT (`joint_blocks.N.x_block.attn.qkv`, `final_layer.adaLN_modulation.1`, ...)."""
    sd, out = dict(state_dict), {}
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in blocks:
        b, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        _fuse(sd, out, [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"], f"{j}.x_block.attn.qkv")
        _fuse(sd, out, [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"],
              f"{j}.context_block.attn.qkv")
        _fuse(sd, out, [f"{b}.attn2.to_q", f"{b}.attn2.to_k", f"{b}.attn2.to_v"], f"{j}.x_block.attn2.qkv")
    last = blocks[-1]
    for leaf in ("weight", "bias"):  # the context_pre_only last block and the final norm store (shift, scale)
        key = f"transformer_blocks.{last}.norm1_context.linear.{leaf}"
        out[f"joint_blocks.{last}.context_block.adaLN_modulation.1.{leaf}"] = swap_halves(sd.pop(key))
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = swap_halves(sd.pop(f"norm_out.linear.{leaf}"))
    _rename(sd, out, [
        (r"pos_embed\.pos_embed", r"pos_embed"),
        (r"pos_embed\.proj\.(\w+)", r"x_embedder.proj.\1"),
        (r"time_text_embed\.timestep_embedder\.linear_1\.(\w+)", r"t_embedder.mlp.0.\1"),
        (r"time_text_embed\.timestep_embedder\.linear_2\.(\w+)", r"t_embedder.mlp.2.\1"),
        (r"time_text_embed\.text_embedder\.linear_1\.(\w+)", r"y_embedder.mlp.0.\1"),
        (r"time_text_embed\.text_embedder\.linear_2\.(\w+)", r"y_embedder.mlp.2.\1"),
        (r"context_embedder\.(\w+)", r"context_embedder.\1"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"joint_blocks.\1.x_block.attn.ln_q.weight"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"joint_blocks.\1.x_block.attn.ln_k.weight"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"joint_blocks.\1.context_block.attn.ln_q.weight"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"joint_blocks.\1.context_block.attn.ln_k.weight"),
        (r"transformer_blocks\.(\d+)\.attn2\.norm_q\.weight", r"joint_blocks.\1.x_block.attn2.ln_q.weight"),
        (r"transformer_blocks\.(\d+)\.attn2\.norm_k\.weight", r"joint_blocks.\1.x_block.attn2.ln_k.weight"),
        (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(\w+)", r"joint_blocks.\1.x_block.attn.proj.\2"),
        (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0\.(\w+)", r"joint_blocks.\1.x_block.attn2.proj.\2"),
        (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(\w+)", r"joint_blocks.\1.context_block.attn.proj.\2"),
        (r"transformer_blocks\.(\d+)\.norm1\.linear\.(\w+)", r"joint_blocks.\1.x_block.adaLN_modulation.1.\2"),
        (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(\w+)",
         r"joint_blocks.\1.context_block.adaLN_modulation.1.\2"),
        (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(\w+)", r"joint_blocks.\1.x_block.mlp.fc1.\2"),
        (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(\w+)", r"joint_blocks.\1.x_block.mlp.fc2.\2"),
        (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(\w+)", r"joint_blocks.\1.context_block.mlp.fc1.\2"),
        (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(\w+)", r"joint_blocks.\1.context_block.mlp.fc2.\2"),
        (r"proj_out\.(\w+)", r"final_layer.linear.\1"),
    ])
    return out


def to_original_flux(state_dict: dict) -> dict:
    """Flux.1 (BFL layout: `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1` = q|k|v|mlp, ...)."""
    sd, out = dict(state_dict), {}
    doubles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    singles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")})
    for i in doubles:
        b, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        _fuse(sd, out, [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"], f"{d}.img_attn.qkv")
        _fuse(sd, out, [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"], f"{d}.txt_attn.qkv")
    for i in singles:
        b = f"single_transformer_blocks.{i}"
        _fuse(sd, out, [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"],
              f"single_blocks.{i}.linear1")
    for leaf in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = swap_halves(sd.pop(f"norm_out.linear.{leaf}"))
    _rename(sd, out, [
        (r"time_text_embed\.timestep_embedder\.linear_1\.(\w+)", r"time_in.in_layer.\1"),
        (r"time_text_embed\.timestep_embedder\.linear_2\.(\w+)", r"time_in.out_layer.\1"),
        (r"time_text_embed\.text_embedder\.linear_1\.(\w+)", r"vector_in.in_layer.\1"),
        (r"time_text_embed\.text_embedder\.linear_2\.(\w+)", r"vector_in.out_layer.\1"),
        (r"time_text_embed\.guidance_embedder\.linear_1\.(\w+)", r"guidance_in.in_layer.\1"),
        (r"time_text_embed\.guidance_embedder\.linear_2\.(\w+)", r"guidance_in.out_layer.\1"),
        (r"context_embedder\.(\w+)", r"txt_in.\1"),
        (r"x_embedder\.(\w+)", r"img_in.\1"),
        (r"transformer_blocks\.(\d+)\.norm1\.linear\.(\w+)", r"double_blocks.\1.img_mod.lin.\2"),
        (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(\w+)", r"double_blocks.\1.txt_mod.lin.\2"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
        (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(\w+)", r"double_blocks.\1.img_mlp.0.\2"),
        (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(\w+)", r"double_blocks.\1.img_mlp.2.\2"),
        (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(\w+)", r"double_blocks.\1.txt_mlp.0.\2"),
        (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(\w+)", r"double_blocks.\1.txt_mlp.2.\2"),
        (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(\w+)", r"double_blocks.\1.img_attn.proj.\2"),
        (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(\w+)", r"double_blocks.\1.txt_attn.proj.\2"),
        (r"single_transformer_blocks\.(\d+)\.norm\.linear\.(\w+)", r"single_blocks.\1.modulation.lin.\2"),
        (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
        (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
        (r"single_transformer_blocks\.(\d+)\.proj_out\.(\w+)", r"single_blocks.\1.linear2.\2"),
        (r"proj_out\.(\w+)", r"final_layer.linear.\1"),
    ])
    return out


def to_original_wan(state_dict: dict) -> dict:
    """Wan 2.1 (`blocks.N.self_attn.q`, `blocks.N.norm3` = the cross-attention norm, `head.head`, ...)."""
    sd, out = dict(state_dict), {}
    _rename(sd, out, [
        (r"patch_embedding\.(\w+)", r"patch_embedding.\1"),
        (r"condition_embedder\.time_embedder\.linear_1\.(\w+)", r"time_embedding.0.\1"),
        (r"condition_embedder\.time_embedder\.linear_2\.(\w+)", r"time_embedding.2.\1"),
        (r"condition_embedder\.text_embedder\.linear_1\.(\w+)", r"text_embedding.0.\1"),
        (r"condition_embedder\.text_embedder\.linear_2\.(\w+)", r"text_embedding.2.\1"),
        (r"condition_embedder\.time_proj\.(\w+)", r"time_projection.1.\1"),
        (r"condition_embedder\.image_embedder\.norm1\.(\w+)", r"img_emb.proj.0.\1"),  # image-to-video (I2V)
        (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.(\w+)", r"img_emb.proj.1.\1"),
        (r"condition_embedder\.image_embedder\.ff\.net\.2\.(\w+)", r"img_emb.proj.3.\1"),
        (r"condition_embedder\.image_embedder\.norm2\.(\w+)", r"img_emb.proj.4.\1"),
        (r"blocks\.(\d+)\.attn2\.add_(k|v)_proj\.(\w+)", r"blocks.\1.cross_attn.\2_img.\3"),
        (r"blocks\.(\d+)\.attn2\.norm_added_k\.(\w+)", r"blocks.\1.cross_attn.norm_k_img.\2"),
        (r"blocks\.(\d+)\.attn1\.to_(q|k|v)\.(\w+)", r"blocks.\1.self_attn.\2.\3"),
        (r"blocks\.(\d+)\.attn1\.to_out\.0\.(\w+)", r"blocks.\1.self_attn.o.\2"),
        (r"blocks\.(\d+)\.attn1\.norm_(q|k)\.(\w+)", r"blocks.\1.self_attn.norm_\2.\3"),
        (r"blocks\.(\d+)\.attn2\.to_(q|k|v)\.(\w+)", r"blocks.\1.cross_attn.\2.\3"),
        (r"blocks\.(\d+)\.attn2\.to_out\.0\.(\w+)", r"blocks.\1.cross_attn.o.\2"),
        (r"blocks\.(\d+)\.attn2\.norm_(q|k)\.(\w+)", r"blocks.\1.cross_attn.norm_\2.\3"),
        (r"blocks\.(\d+)\.norm2\.(\w+)", r"blocks.\1.norm3.\2"),  # the cross-attention norm
        (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.(\w+)", r"blocks.\1.ffn.0.\2"),
        (r"blocks\.(\d+)\.ffn\.net\.2\.(\w+)", r"blocks.\1.ffn.2.\2"),
        (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
        (r"proj_out\.(\w+)", r"head.head.\1"),
        (r"scale_shift_table", r"head.modulation"),
    ])
    return out


TO_ORIGINAL = {
    "PixArtTransformer2DModel": to_original_pixart,
    "SD3Transformer2DModel": to_original_sd3,
    "FluxTransformer2DModel": to_original_flux,
    "WanTransformer3DModel": to_original_wan,
}
