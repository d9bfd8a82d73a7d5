"""Tiny, randomly initialised diffusers DiTs (the "zoo") plus a tiny offline PixArt-α pipeline.

Used by tests to exercise quantization on every supported transformer class on CPU, with no Hub access.

* ``ZOO[cls_name]`` is a :class:`ZooEntry`: ``entry.build(seed)`` -> model in eval mode,
  ``entry.make_inputs(seed)`` -> forward kwargs, ``run(model, inputs)`` -> output sample tensor.
* Configs start from known-good tiny kwargs for each diffusers class but are widened so that the
  main-block Linears have ``in_features`` that are multiples of 32 (inner dim 32, 64 or 96; cross-attention /
  caption / text dims 32), so group-size-32 weight quantization applies to them. Every widened entry still
  builds in a few ms and forwards in well under 0.5 s on CPU. Changes are commented per entry.
* Weights: ``build`` seeds torch, constructs the class (diffusers' default init) and then re-draws every
  all-zero non-norm parameter as N(0, 0.02^2), so nothing is trivially zero/constant (original DiT/PixArt
  code zero-inits adaLN-Zero and ``proj_out``; diffusers 0.42 does not for these classes, and the only hit
  is Mochi's ``rope.pos_frequencies``). Every ``nn.Linear`` influences the output (checked in
  ``tests/integration/test_zoo.py``) except the few listed in ``ZooEntry.inert``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import diffusers

# ----------------------------------------------------------------------------------------------- helpers


def _gen(seed: torch.Generator | int) -> torch.Generator:
    """A CPU generator from an int seed (or the generator itself)."""
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _t(g, b, hi=1000.0):
    """Float timesteps uniform in [0, hi)."""
    return torch.rand(b, generator=g, dtype=torch.float32) * hi


def _tint(g, b, hi=1000):
    """Integer (long) timesteps in [0, hi)."""
    return torch.randint(0, hi, (b,), generator=g)


def _mask(g, b, n, dtype=torch.float32, min_keep=2):
    """Text padding mask: each row keeps a random prefix of >= min_keep tokens (like a padded prompt)."""
    keep = torch.randint(min_keep, n + 1, (b,), generator=g)
    return (torch.arange(n)[None, :] < keep[:, None]).to(dtype)


@dataclass(frozen=True)
class ZooEntry:
    """One tiny model: diffusers class name, constructor kwargs, a seeded input factory and its output shape."""

    cls_name: str
    kwargs: dict
    make_inputs: Callable[[torch.Generator | int], dict]
    out_shape: tuple  # shape of run(model, make_inputs(seed))
    # Linear names (relative to the model) that are known not to affect the output, with the reason.
    inert: dict = field(default_factory=dict)

    @property
    def cls(self) -> type:
        return getattr(diffusers, self.cls_name)

    def build(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = self.cls(**self.kwargs)
        _reinit_zero_params(model, seed)
        return model.eval()


@torch.no_grad()
def _reinit_zero_params(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Re-draw every all-zero parameter as N(0, std^2) (deterministically).

    Targets diffusers' zero inits (adaLN-Zero linears, ``proj_out``, zero ``scale_shift_table``/biases).
    Norm layers are left alone (weights stay 1, biases 0), as are parameters that are not all zero.
    """
    g = torch.Generator().manual_seed(seed + 12345)
    # parameters owned directly by a norm layer (torch's or diffusers' *Norm* classes; adaLN variants hold
    # their modulation in a child Linear, which is not excluded)
    norm_params = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    for p in model.parameters():
        if id(p) not in norm_params and p.numel() and not p.any():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The zoo's forward convention: ``model(**inputs, return_dict=False)[0]`` (the output sample)."""
    return model(**inputs, return_dict=False)[0]


# ----------------------------------------------------------------------------------------------- inputs
# Each ``_in_*`` takes a seed/generator and returns forward kwargs, shapes matching the entry's kwargs.


def _in_pixart(s):
    g = _gen(s)
    return dict(
        hidden_states=_randn(g, 2, 4, 8, 8),
        timestep=_tint(g, 2),
        encoder_hidden_states=_randn(g, 2, 8, 32),
        encoder_attention_mask=_mask(g, 2, 8),
        added_cond_kwargs={"aspect_ratio": None, "resolution": None},
    )


def _in_dit(s):
    g = _gen(s)
    labels = torch.randint(0, 4, (2,), generator=g)
    return dict(hidden_states=_randn(g, 2, 4, 8, 8), timestep=_tint(g, 2), class_labels=labels)


def _in_sd3(s):
    g = _gen(s)
    return dict(
        hidden_states=_randn(g, 2, 4, 16, 16),
        encoder_hidden_states=_randn(g, 2, 8, 32),
        pooled_projections=_randn(g, 2, 32),
        timestep=_t(g, 2),
    )


def _in_flux(s):
    g = _gen(s)
    h = w = 4  # 16 packed image tokens on a 4x4 grid; ids are (0, row, col), text ids are zeros
    rows, cols = torch.meshgrid(torch.arange(h * 1.0), torch.arange(w * 1.0), indexing="ij")  # float positions
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1)
    return dict(
        hidden_states=_randn(g, 1, h * w, 4),
        encoder_hidden_states=_randn(g, 1, 48, 32),
        pooled_projections=_randn(g, 1, 32),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(48, 3),
        timestep=_t(g, 1, 1.0),  # Flux pipelines pass t / 1000
    )


def _in_sana(s):
    g = _gen(s)
    return dict(
        hidden_states=_randn(g, 2, 4, 32, 32),
        encoder_hidden_states=_randn(g, 2, 8, 32),
        encoder_attention_mask=_mask(g, 2, 8),
        timestep=_t(g, 2),
    )


def _in_hunyuan_dit(s):
    g = _gen(s)
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    rope = get_2d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), use_real=True)  # head_dim 16, 4x4 patch grid
    return dict(
        hidden_states=_randn(g, 2, 4, 8, 8),
        timestep=_t(g, 2),
        encoder_hidden_states=_randn(g, 2, 4, 32),
        text_embedding_mask=_mask(g, 2, 4, torch.long),
        encoder_hidden_states_t5=_randn(g, 2, 4, 32),
        text_embedding_mask_t5=_mask(g, 2, 4, torch.long),
        image_meta_size=torch.tensor([[8.0, 8, 8, 8, 0, 0]] * 2),
        style=torch.zeros(2, dtype=torch.long),
        image_rotary_emb=rope,
    )


def _in_qwen(s):
    g = _gen(s)
    return dict(
        hidden_states=_randn(g, 1, 16, 16),
        encoder_hidden_states=_randn(g, 1, 8, 32),
        encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long),
        timestep=_t(g, 1, 1.0),  # Qwen pipelines pass t / 1000
        img_shapes=[(1, 4, 4)],
    )


def _in_cogvideox(s):
    g = _gen(s)
    return dict(hidden_states=_randn(g, 2, 1, 4, 8, 8), encoder_hidden_states=_randn(g, 2, 8, 32), timestep=_tint(g, 2))


def _in_latte(s):
    g = _gen(s)
    return dict(
        hidden_states=_randn(g, 2, 4, 2, 8, 8),
        encoder_hidden_states=_randn(g, 2, 8, 32),
        timestep=_tint(g, 2),
        enable_temporal_attentions=True,
    )


def _in_allegro(s):
    g = _gen(s)
    return dict(
        hidden_states=_randn(g, 2, 4, 2, 8, 8), encoder_hidden_states=_randn(g, 2, 16, 32), timestep=_tint(g, 2))


def _in_wan(s):
    g = _gen(s)
    return dict(hidden_states=_randn(g, 1, 4, 2, 16, 16), encoder_hidden_states=_randn(g, 1, 12, 32), timestep=_t(g, 1))


def _in_hunyuan_video(s):
    g = _gen(s)
    return dict(
        hidden_states=_randn(g, 1, 4, 1, 16, 16),
        timestep=_t(g, 1),
        encoder_hidden_states=_randn(g, 1, 12, 32),
        pooled_projections=_randn(g, 1, 32),
        encoder_attention_mask=_mask(g, 1, 12),
        guidance=torch.tensor([6000.0]),  # pipeline passes guidance_scale * 1000
    )


def _in_ltx(s):
    g = _gen(s)
    return dict(
        hidden_states=_randn(g, 2, 2 * 16 * 16, 4),
        encoder_hidden_states=_randn(g, 2, 16, 32),
        timestep=_t(g, 2),
        encoder_attention_mask=_mask(g, 2, 16, torch.bool),
        num_frames=2,
        height=16,
        width=16,
    )


def _in_mochi(s):
    g = _gen(s)
    return dict(
        hidden_states=_randn(g, 2, 4, 2, 16, 16),
        encoder_hidden_states=_randn(g, 2, 16, 32),
        timestep=_t(g, 2),
        encoder_attention_mask=_mask(g, 2, 16, torch.bool),
    )


def _in_sana_video(s):
    g = _gen(s)
    return dict(
        hidden_states=_randn(g, 1, 16, 2, 16, 16), encoder_hidden_states=_randn(g, 1, 12, 32), timestep=_t(g, 1))


# ----------------------------------------------------------------------------------------------- the zoo

# The last joint block of SD3 / Mochi is ``context_pre_only`` and Qwen's last block's text-stream output is
# dropped: these Linears only feed the discarded text-token output, so they genuinely cannot affect the sample.
_CTX_LAST = "last block: only feeds the discarded text-token output"

_ENTRIES = [
    # inner 2x16=32 (was 2x2); real caption projection (caption_channels=32 -> inner) and cross dim 32.
    ZooEntry("PixArtTransformer2DModel", dict(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=16, num_attention_heads=2, in_channels=4,
        cross_attention_dim=32, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=8, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False, caption_channels=32), _in_pixart, (2, 8, 8, 8)),
    # inner 2x16=32 (was 2x4).
    ZooEntry("DiTTransformer2DModel", dict(
        in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_attention_heads=2, attention_head_dim=16,
        attention_bias=True, num_layers=1, norm_type="ada_norm_zero", num_embeds_ada_norm=8, patch_size=2,
        sample_size=8), _in_dit, (2, 8, 8, 8)),
    # inner 2x16=32 (was 2x8); caption/joint/pooled dims 32 (were 16).
    ZooEntry("SD3Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(), qk_norm=None), _in_sd3, (2, 4, 16, 16),
        inert={"transformer_blocks.1.attn.add_q_proj": _CTX_LAST}),
    # unchanged (inner 32, joint/pooled 32); x_embedder in=4 is the patch-in layer.
    ZooEntry("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]), _in_flux, (1, 16, 4)),
    # inner 2x16=32 (was 2x4), cross 2x16 with cross_attention_dim 32, caption_channels 32.
    ZooEntry("SanaTransformer2DModel", dict(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        sample_size=32), _in_sana, (2, 4, 32, 32)),
    # inner 2x16=32 = hidden_size (was 2x8 / 16); text dims 32; pooled 32.
    ZooEntry("HunyuanDiT2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        cross_attention_dim=32, cross_attention_dim_t5=32, pooled_projection_dim=32, hidden_size=32, text_len=4,
        text_len_t5=4, activation_fn="gelu-approximate"), _in_hunyuan_dit, (2, 8, 8, 8)),
    # inner 4x16=64 (unchanged); joint_attention_dim 32 (was 16). img_in in=16 is the patch-in layer.
    ZooEntry("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 4, 4)), _in_qwen, (1, 16, 16),
        inert={f"transformer_blocks.1.{n}": _CTX_LAST
               for n in ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")}),
    # inner 2x16=32 (was 2x8); time_embed_dim 32 (was 2; it is the adaLN norm*.linear in_features); text 32.
    ZooEntry("CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
        patch_size_t=None, temporal_compression_ratio=4, max_text_seq_length=8), _in_cogvideox, (2, 1, 4, 8, 8)),
    # inner 2x16=32 (was 2x4), caption/cross 32. 2 frames + video_length=2 (was 1 frame): with a single
    # frame the temporal attention is a 1-token softmax and its to_q/to_k could not affect the output.
    ZooEntry("LatteTransformer3DModel", dict(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=16, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=32, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        video_length=2), _in_latte, (2, 8, 2, 8, 8)),
    # inner 2x16=32 (was 2x8), cross 32, caption 32.
    ZooEntry("AllegroTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=1,
        cross_attention_dim=32, sample_width=8, sample_height=8, sample_frames=8, caption_channels=32),
        _in_allegro, (2, 4, 2, 8, 8)),
    # inner 2x16=32 (was 2x12), text_dim 32, ffn_dim 64 (were 16, 32).
    ZooEntry("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32), _in_wan, (1, 4, 2, 16, 16)),
    # inner 2x16=32 (was 2x10), rope axes (4,6,6) sum to head_dim; text 32, pooled 32.
    ZooEntry("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6), image_condition_type=None),
        _in_hunyuan_video, (1, 4, 1, 16, 16)),
    # inner 2x16=32 (was 2x8), cross/caption 32. proj_in in=4 is the patch-in layer.
    ZooEntry("LTXVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=1, qk_norm="rms_norm_across_heads", caption_channels=32), _in_ltx, (2, 512, 4)),
    # inner 2x48=96 (was 2x8) and context stream (pooled_projection_dim) 96 (was 16): the SwiGLU inner dim is
    # 8*dim//3, which is a multiple of 32 (256) only for dim % 96 == 0. text 32, time_embed_dim 32 (were 16, 4).
    ZooEntry("MochiTransformer3DModel", dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=48, num_layers=2, pooled_projection_dim=96,
        in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=32,
        activation_fn="swiglu", max_sequence_length=16), _in_mochi, (2, 4, 2, 16, 16),
        inert={"transformer_blocks.1.attn1.add_q_proj": _CTX_LAST}),
    # inner 2x16=32 (was 2x12), cross 2x16 / 32, caption 32.
    ZooEntry("SanaVideoTransformer3DModel", dict(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
        norm_elementwise_affine=False, norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        _in_sana_video, (1, 16, 2, 16, 16)),
]

ZOO: dict[str, ZooEntry] = {e.cls_name: e for e in _ENTRIES}


# ----------------------------------------------------------------------------------------------- tiny pipeline

# Words the tiny tokenizer knows as whole pieces; other text falls back to single characters (else <unk>).
_WORDS = "a an the of in on with and digit number thick thin bold italic small large handwritten black white".split()
_WORDS += [str(i) for i in range(10)] + "zero one two three four five six seven eight nine".split()


def _tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer built in code: <pad>=0, </s>=1, <unk>=2, word pieces, char fallback.

    (A custom normalizer, e.g. lowercasing, would not survive save/reload: transformers 5 rebuilds the
    T5 tokenizer from its vocab, so case is handled with upper-case fallback pieces instead.)"""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-\""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in dict.fromkeys(_WORDS)]
    vocab += [(c, -10.0) for c in chars]  # in-word fallback pieces
    vocab += [("\u2581" + c, -9.0) for c in chars if c not in _WORDS]  # word-start fallback pieces
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=120)


def build_tiny_pixart_pipeline(path: str | os.PathLike, seed: int = 0) -> str:
    """Save a tiny random, fully offline ``PixArtAlphaPipeline`` at ``path`` and return ``str(path)``.

    Latent 16x16x4 (image 32x32, VAE factor 2), transformer 2 layers x 64 dims (2 heads x 32), learned sigma
    (out_channels 8), T5 encoder d_model 32 (= caption_channels). Call it with ``height=32, width=32,
    use_resolution_binning=False`` (binning only exists for sample_size 32/64/128 and raises otherwise)
    and preferably ``clean_caption=False`` (the default True only warns when bs4/ftfy are missing).
    """
    from transformers import T5Config, T5EncoderModel

    tokenizer = _tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32).eval()
    transformer = diffusers.PixArtTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=32, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=64, caption_channels=32, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6).eval()
    _reinit_zero_params(transformer, seed)
    # PixArt-alpha's scheduler config (linear betas, DPM-Solver++ order 2, epsilon prediction)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", solver_order=2, algorithm_type="dpmsolver++")
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(str(path))
    return str(path)
