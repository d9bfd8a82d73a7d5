"""W8A8 / W4A8 GEMM (Triton): int8 activations x int8 or packed-int4 weights, int32 accumulation on the
tensor cores, and a fused epilogue (zero points, per-group and per-channel weight scales, per-token
activation scales, bias, cast to the activation dtype).

- W4 weights stay packed (two codes per byte, low nibble first, stored as code + 8): each tile is unpacked
  in registers (mask / shift, then `tl.interleave`) and the zero point is subtracted there, which fits int8
  since 4-bit codes and zero points lie in [-8, 7]; no int8 copy of the weight is ever written.
- W8 with zero points folds them in with the row sums of the activation codes: from the quantization
  kernel for per-channel weights, from the A tile inside the loop for group-wise ones.
- Group-wise weights (group size a multiple of BLOCK_K) accumulate each group in int32 and add it to an
  fp32 accumulator times that group's scales, as the torch path does.
- Masks, not padding, handle ragged M / N / K.

The integer accumulators are exact, so the result matches the torch path (`torch_ops.linear_int`) up to
the rounding of the last fp32 operations (at most one unit in the last place of the output dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton import knobs


def _configs():
    if knobs.runtime.interpret:  # the CPU interpreter: one config, big blocks
        return [triton.Config(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32), num_warps=4, num_stages=1)]
    shapes = [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (64, 128, 128, 4, 4),
              (128, 64, 128, 4, 4), (64, 64, 128, 4, 4), (128, 128, 64, 4, 4), (64, 256, 128, 8, 3)]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _fits_group(configs, named_args, **kwargs):
    """Group-wise weights need BLOCK_K to divide the group size."""
    group = named_args["GROUP_SIZE"] if "GROUP_SIZE" in named_args else kwargs["GROUP_SIZE"]
    fitting = [c for c in configs if group == 0 or group % c.kwargs["BLOCK_K"] == 0]
    if not fitting:
        raise ValueError(f"group size {group} is not a multiple of any BLOCK_K in the Triton configs")
    return fitting


@triton.jit
def _load_b_tile(b_ptr, zero_ptr, offs_n, k0, N, K, stride_bn, stride_zn, g,
                 W4: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight tile `[BLOCK_K, BLOCK_N]` (K-major) as int8, W4 unpacked and zero-corrected."""
    n_mask = offs_n < N
    if W4:
        offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = n_mask[:, None] & (offs_p[None, :] < (K + 1) // 2)
        p = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_p[None, :], mask=mask, other=0x88)
        low = (p & 0x0F).to(tl.int8) - 8
        high = (p >> 4).to(tl.int8) - 8
        if HAS_ZERO:
            z = tl.load(zero_ptr + offs_n * stride_zn + g, mask=n_mask, other=0)
            low, high = low - z[:, None], high - z[:, None]
        w = tl.interleave(low, high)                         # [BLOCK_N, BLOCK_K], low nibble first
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = n_mask[:, None] & (offs_k[None, :] < K)
        w = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_k[None, :], mask=mask, other=0)
    return tl.trans(w)


@triton.autotune(configs=_configs(), key=["M", "N", "K", "GROUP_SIZE", "W4"],
                 prune_configs_by=dict(early_config_prune=_fits_group))
@triton.jit
def _int_gemm(a_ptr, b_ptr, c_ptr, xs_ptr, ws_ptr, zero_ptr, rowsum_ptr, bias_ptr,
              M, N, K, stride_am, stride_bn, stride_cm, stride_wn, stride_zn,
              GROUP_SIZE: tl.constexpr, W4: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    # zero points of W8 are folded in with activation row sums; W4 subtracts them in the tile
    W8_ZERO: tl.constexpr = HAS_ZERO and not W4
    if GROUP_SIZE == 0:  # per-channel: one int32 accumulator over all of K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K), other=0)
            b = _load_b_tile(b_ptr, zero_ptr, offs_n, k0, N, K, stride_bn, stride_zn, 0, W4, HAS_ZERO, BLOCK_K)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if W8_ZERO:
            rs = tl.load(rowsum_ptr + offs_m, mask=m_mask, other=0)
            z = tl.load(zero_ptr + offs_n * stride_zn, mask=n_mask, other=0).to(tl.int32)
            acc = acc - rs[:, None] * z[None, :]
        ws = tl.load(ws_ptr + offs_n * stride_wn, mask=n_mask, other=0.0)
        y = acc.to(tl.float32) * ws[None, :]
    else:
        y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, K // GROUP_SIZE):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            rs = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for kk in range(0, GROUP_SIZE, BLOCK_K):
                k0 = g * GROUP_SIZE + kk
                offs_k = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K), other=0)
                b = _load_b_tile(b_ptr, zero_ptr, offs_n, k0, N, K, stride_bn, stride_zn, g, W4, HAS_ZERO, BLOCK_K)
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
                if W8_ZERO:
                    rs += tl.sum(a.to(tl.int32), axis=1)
            if W8_ZERO:
                z = tl.load(zero_ptr + offs_n * stride_zn + g, mask=n_mask, other=0).to(tl.int32)
                acc = acc - rs[:, None] * z[None, :]
            ws = tl.load(ws_ptr + offs_n * stride_wn + g, mask=n_mask, other=0.0)
            y += acc.to(tl.float32) * ws[None, :]
    xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
    y = y * xs[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c, y.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def int_gemm(xq: torch.Tensor, x_scale: torch.Tensor, rowsum: torch.Tensor, qweight: torch.Tensor,
             weight_bits: int, scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None,
             out_dtype: torch.dtype) -> torch.Tensor:
    """`y [M, N] = (xq * x_scale) @ W^T + bias` from int8 activation codes and quantized weights.

    `xq` int8 `[M, K]`, `x_scale` fp32 `[M, 1]`, `rowsum` int32 `[M]` (sums of `xq` rows);
    `qweight` int8 `[N, K]` (W8) or packed uint8 `[N, ceil(K / 2)]` (W4); `scale` fp32 `[N, G]`;
    `zero` int8 `[N, G]` or None. Per-tensor weight scales (`[1, 1]`) are expanded to `[N, 1]`.
    """
    m, k = xq.shape
    n = qweight.shape[0]
    groups = scale.shape[1]
    if scale.shape[0] != n:  # per-tensor (the naive baseline)
        scale = scale.expand(n, groups)
        zero = None if zero is None else zero.expand(n, groups)
    group_size = 0 if groups == 1 else k // groups
    c = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return c
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _int_gemm[grid](
        xq, qweight, c, x_scale, scale, zero if zero is not None else scale, rowsum,
        bias if bias is not None else scale, m, n, k, xq.stride(0), qweight.stride(0), c.stride(0),
        scale.stride(0), zero.stride(0) if zero is not None else 0,
        GROUP_SIZE=group_size, W4=weight_bits == 4, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None,
        enable_fp_fusion=False,  # no FMA in the epilogue: round each product and sum as the torch path does
    )
    return c
