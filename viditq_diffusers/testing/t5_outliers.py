"""A T5-shaped encoder with T5-like activation outliers, for measuring text-encoder quantization. SYNTHETIC: random
weights, a test subject for quantizers, not a language model.

The text encoders that ship with the reference pipelines are tiny (64 wide) and briefly trained: their
activations have no outliers. Released T5 encoders (T5 v1.1, T5-XXL of PixArt / SD3 / Flux) do: a handful of
hidden channels are tens of times larger than the typical one in the inputs of every block's linears, which is
what makes per-token 8-bit activations lossy (the token's scale is set by the outlier, the typical channels are
rounded to a few levels) and why their weights alone are quantized by default.

Construction (:func:`outlier_t5_encoder`)::

    T5EncoderModel(T5Config(d_model, d_ff, num_heads, d_kv, num_layers, gated-gelu))   # T5 v1.1 / XXL layout
    weights drawn by transformers' T5 initialisation (std d_model^-0.5 for k / v / wi, (d_model d_kv)^-0.5 for
        q, (heads d_kv)^-0.5 for o, d_ff^-0.5 for wo, 1 for the token embeddings), seeded
    every layer's RMSNorm weight (before attention and before the FFN): the same `channels` hidden channels,
        drawn once from `seed`, are set to `k` (the others stay 1)
        =>  the inputs of q / k / v and wi_0 / wi_1 carry `channels` channels about k times the typical one

The weights themselves are not rescaled: unlike `stress` for the denoiser (which keeps the model's function), the
outliers here change the function; the floating-point reference is this model itself. In trained models the
weight columns that meet the outlier channels are ordinary, so the weights stay easy to quantize, as here. With
random weights the outliers also make the query and key vectors larger, hence sharper attention (trained models
temper this): the stack is more sensitive to any error than the same stack at k=1, so compare configs on one model.
``wo`` (the FFN output, in T5's ``_keep_in_fp32_modules``) is quantized weight-only in every plan: its activations
stay floating point.
"""

from __future__ import annotations

import torch
import transformers


def outlier_channels(d_model: int, channels: int, seed: int) -> list[int]:
    """The `channels` hidden channels (sorted) that carry the outliers, drawn from `seed`."""
    if not 0 <= channels <= d_model:
        raise ValueError(f"channels must be in [0, d_model={d_model}], got {channels}")
    order = torch.randperm(d_model, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:channels].tolist())


@torch.no_grad()
def outlier_t5_encoder(d_model: int = 4096, d_ff: int = 10240, num_heads: int = 64, d_kv: int = 64,
                       num_layers: int = 2, vocab_size: int = 1024, k: float = 30.0, channels: int = 6,
                       seed: int = 0) -> transformers.T5EncoderModel:
    """A `T5EncoderModel` in eval mode (fp32) with outliers of factor `k` on `channels` hidden channels (see the
    module docstring). Defaults: T5-XXL's widths at 2 of its 24 layers, a small vocabulary (the embeddings stay in
    floating point and do not matter here). The chosen channels are kept as ``model.viditq_outliers``."""
    if not k > 0:
        raise ValueError(f"k must be positive, got {k}")
    config = transformers.T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_kv=d_kv,
                                   num_layers=num_layers, feed_forward_proj="gated-gelu",
                                   relative_attention_num_buckets=32, dropout_rate=0.0)
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(config).eval()
    picked = outlier_channels(d_model, channels, seed)
    for block in model.encoder.block:
        for layer in block.layer:  # T5LayerSelfAttention, T5LayerFF: each starts with its RMSNorm
            layer.layer_norm.weight[picked] = k
    model.viditq_outliers = {"synthetic": True, "seed": seed, "k": k, "channels": picked}
    return model
