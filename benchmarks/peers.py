"""Peer W8A8 quantizers for the PixArt-alpha benchmarks: what a user could pick instead of ViDiT-Q.

Only the benchmarks import this module (the `viditq_diffusers` package never does); each peer is
imported lazily, inside its function. `PEERS` maps a label to `fn(model, calib_kwargs) -> model`:
`model` is an fp32 `PixArtTransformer2DModel` (eval, requires_grad False), quantized in place with
the peer's public API; run the returned module (for torch.compile, the compiled wrapper).
`calib_kwargs` are forward kwargs (`pixart_alpha.inputs`); only quanto uses them. All four run
under `torch.inference_mode()` (and `torch.no_grad()`). 1-layer check, batch-2 inputs, PSNR of the
output vs fp32: torchao 52.5 dB (eager and compiled), quanto 50.0 dB, SDNQ 78.9 dB.

- torchao 0.18.0, eager: `quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))`
  (`False` only avoids changing global inductor options; eager does not use them). Every `nn.Linear`
  weight becomes an `Int8Tensor` (int8 per row, symmetric); activations are quantized per token,
  symmetric, at run time; GEMM `torch._int_mm` (s8s8), then rescaling. `reduce_range` is left at
  its default False although torchao's `should_reduce_range()` suggests True on CPUs without VNNI
  (overflow risk); that gave the 52.5 dB above on an AVX2-only CPU.
- torchao 0.18.0, compiled: the same with the default config (`set_inductor_config=True` sets global
  inductor options, e.g. `fx_graph_cache`), then `torch.compile(model)`. Raises `RuntimeError` if
  inductor cannot compile a toy function here (it needs a C++ compiler). Compilation happens at the
  first forward (minutes for 28 layers): warm up before timing. The compiled graph still calls
  `aten::_int_mm` for the 16 Linear GEMMs of a 1-layer model.
- optimum-quanto 0.2.7: `quantize(model, weights=qint8, activations=qint8)`, one calibration forward
  `with Calibration(): model(**calib_kwargs)`, then `freeze(model)`. Quantizes `nn.Linear`,
  `nn.Conv2d` and `nn.LayerNorm` (outputs); weights int8 per output channel, activations int8 with
  *static* per-tensor scales from the calibration (absmax, momentum 0.9); Linear GEMMs are
  `torch._int_mm`. Calibrated on the very inputs it is then run on: a best case for static scales.
- SDNQ 0.2.8: `sdnq_post_load_quant(model, weights_dtype="int8", use_quantized_matmul=True)`. Linear
  weights int8 per row (symmetric, stored transposed), activations quantized per token at run time,
  GEMM `torch._int_mm`. OpenVINO is not installed, so SDNQ warns that its OpenVINO kernels are
  unavailable and uses its PyTorch path, which it wraps in `torch.compile` itself on CPU: importing
  sdnq compiles a test function and raises dynamo's recompile limits globally, and the first forward
  compiles (slow warm-up). Its default skip list leaves `adaln_single`, `pos_embed`, `proj_out` and
  norms in fp32 (on a 1-layer model that is 46% of fp32 bytes, vs 27.5% for torchao and quanto).
"""

from __future__ import annotations

from typing import Callable

import torch


def torchao_int8(model: torch.nn.Module, calib_kwargs: dict | None = None) -> torch.nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    return model


def torchao_int8_compiled(model: torch.nn.Module, calib_kwargs: dict | None = None) -> torch.nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    try:  # inductor compiles C++ for CPU: probe it on a toy function before touching the model
        torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(8))
    except Exception as e:
        raise RuntimeError(f"inductor cannot compile on this machine ({type(e).__name__}: {e})") from e
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(model)


def quanto_w8a8(model: torch.nn.Module, calib_kwargs: dict | None = None) -> torch.nn.Module:
    from optimum.quanto import Calibration, freeze, qint8, quantize

    if calib_kwargs is None:
        from benchmarks.pixart_alpha import inputs

        calib_kwargs = inputs(torch.float32)
    quantize(model, weights=qint8, activations=qint8)
    with torch.inference_mode(), Calibration():
        model(**calib_kwargs)
    freeze(model)
    return model


def sdnq_int8(model: torch.nn.Module, calib_kwargs: dict | None = None) -> torch.nn.Module:
    from sdnq import sdnq_post_load_quant

    return sdnq_post_load_quant(model, weights_dtype="int8", use_quantized_matmul=True)


PEERS: dict[str, Callable[[torch.nn.Module, dict | None], torch.nn.Module]] = {
    "torchao int8 dyn-act/int8-weight (eager)": torchao_int8,
    "torchao int8 dyn-act/int8-weight (torch.compile)": torchao_int8_compiled,
    "optimum-quanto W8A8 (static act scales)": quanto_w8a8,
    "SDNQ int8 W8A8 (dyn act, SDNQ's own torch.compile)": sdnq_int8,
}


def _stored(t: torch.Tensor) -> int:
    """Bytes of `t` as stored: plain tensors by numel, tensor subclasses by their inner tensors."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_stored(getattr(t, name)) for name in names)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers as stored (int8 data + scales for quantized weights)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(_stored(t) for t in tensors)
