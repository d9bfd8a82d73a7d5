"""Hadamard matrices and the seeded orthogonal rotation of channel balancing.

A Hadamard matrix `H` of order `n` has entries +-1 and `H H^T = n I`, so
`R = D H / sqrt(n)` with `D` a random +-1 diagonal is orthogonal (docs/method.md,
section 3). Rotating the input channels of a linear layer spreads an outlier
channel over all channels, which is what makes per-token activation
quantization work at low bit widths.

Orders we can build: `n = 2^k * p` where
- `2^k` uses Sylvester's construction, `H_2m = [[H_m, H_m], [H_m, -H_m]]`;
- `p` is 1, a Paley I order `q + 1` (prime `q = 3 mod 4`: 12, 20, 24, 44, 48,
  60, ...), a Paley II order `2 (q + 1)` (prime `q = 1 mod 4`: 12, 28, 36, 60,
  ...), or a product of such orders (e.g. 144 = 12 * 12).
The power of two is taken as large as possible so the dense part stays small:
1152 = 36 * 32, 3072 = 12 * 256, 4608 = 36 * 128, 5120 = 20 * 256.

Kronecker ordering: `H_n = H_p kron H_(2^k)`, so channel `i = a * 2^k + b`
(`a < p`, `b < 2^k`) and `H_n[a 2^k + b, c 2^k + d] = H_p[a, c] H_(2^k)[b, d]`.
`rotate` views the last dimension as `[p, 2^k]`, runs a fast Walsh-Hadamard
transform (O(n log n)) over the `2^k` axis and a small dense matmul over the
`p` axis. Row-vector convention throughout: `rotate(x) = x @ R`.
"""

from __future__ import annotations

import functools
import math

import torch


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_kind(p: int) -> int:
    """1 or 2 if order `p` has a Paley I / II construction, else 0."""
    if p >= 4 and _is_prime(p - 1) and (p - 1) % 4 == 3:
        return 1
    if p % 2 == 0 and _is_prime(p // 2 - 1) and (p // 2 - 1) % 4 == 1:
        return 2
    return 0


def _jacobsthal(q: int) -> torch.Tensor:
    """`Q[i, j] = chi(j - i)`, chi the quadratic character mod the prime `q`."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=torch.int64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


@functools.lru_cache(maxsize=None)
def _paley(p: int) -> torch.Tensor:
    """Paley Hadamard matrix of order `p` (int64); `p` must pass `_paley_kind`."""
    kind = _paley_kind(p)
    if kind == 1:
        # q = 3 mod 4: Q is skew, S = [[0, 1^T], [-1, Q]] is skew and S S^T = q I, so H = I + S.
        q = p - 1
        s = torch.zeros(p, p, dtype=torch.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return torch.eye(p, dtype=torch.int64) + s
    if kind == 2:
        # q = 1 mod 4: C = [[0, 1^T], [1, Q]] is symmetric with zero diagonal; replace
        # each 0 by [[1, -1], [-1, -1]] and each +-1 by +-[[1, 1], [1, -1]].
        q = p // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = _jacobsthal(q)
        on_zero = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
        on_one = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
        return torch.kron(c, on_one) + torch.kron(torch.eye(q + 1, dtype=torch.int64), on_zero)
    raise AssertionError(f"order {p} has no Paley construction")


@functools.lru_cache(maxsize=None)
def _paley_factors(p: int) -> tuple[int, ...] | None:
    """Paley orders whose product is `p` (empty for 1), or None if there are none."""
    if p == 1:
        return ()
    if _paley_kind(p):
        return (p,)
    for d in range(3, p // 3 + 1):
        if p % d == 0 and _paley_kind(d):
            rest = _paley_factors(p // d)
            if rest is not None:
                return (d,) + rest
    return None


def _example_orders(limit: int = 100) -> list[int]:
    return [p for p in range(3, limit + 1) if _paley_kind(p) and p & (p - 1)]


@functools.lru_cache(maxsize=None)
def _split_order(n: int) -> tuple[int, int]:
    """`(p, 2^k)` with `n = p * 2^k`, `H_p` buildable, `2^k` as large as possible."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard order must be a positive int, got {n!r}")
    pow2 = n & -n  # largest power of two dividing n
    while pow2 >= 1:
        if _paley_factors(n // pow2) is not None:
            return n // pow2, pow2
        pow2 //= 2
    raise ValueError(
        f"in_features={n} has no known Hadamard matrix of that order; rotation needs "
        f"n = 2^k * p with p = 1 or p in {{{', '.join(map(str, _example_orders()))}, ...}} "
        f"(Paley orders and their products); keep this layer unrotated "
        f"(balance='smooth') or in floating point"
    )


@functools.lru_cache(maxsize=None)
def _dense_factor(p: int) -> torch.Tensor:
    """Cached `H_p` (float64): Kronecker product of its Paley factors."""
    h = torch.ones(1, 1, dtype=torch.int64)
    for d in _paley_factors(p):
        h = torch.kron(h, _paley(d))
    return h.to(torch.float64)


def _sylvester(m: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Hadamard matrix `[n, n]` (entries +-1, `H H^T = n I`) as `H_p kron H_(2^k)`.

    Raises ValueError when no construction for order `n` is known.
    """
    p, pow2 = _split_order(n)
    return torch.kron(_dense_factor(p), _sylvester(pow2)).to(dtype)


@functools.lru_cache(maxsize=256)
def _signs(n: int, seed: int) -> torch.Tensor:
    # A private CPU generator: same draws on every machine and unaffected by global RNG state.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64)
    return (2 * bits - 1).to(torch.float64)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """The diagonal of `D`: `n` values +-1 (float64), a pure function of `(n, seed)`."""
    return _signs(n, seed).clone()


def rotation_matrix(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense orthogonal `R = diag(random_signs(n, seed)) H_n / sqrt(n)`, `[n, n]`."""
    r = _signs(n, seed)[:, None] * hadamard_matrix(n) / math.sqrt(n)
    return r.to(dtype)


@functools.lru_cache(maxsize=128)
def _rotation_parts(n: int, seed: int, dtype: torch.dtype, device: torch.device):
    """Per (n, seed, dtype, device): the input scale `signs / sqrt(n)` and `H_p` (or None)."""
    p, _ = _split_order(n)
    scale = (_signs(n, seed) / math.sqrt(n)).to(device=device, dtype=dtype)
    dense = _dense_factor(p).to(device=device, dtype=dtype) if p > 1 else None
    return scale, dense


def _fwht(y: torch.Tensor) -> torch.Tensor:
    """`y @ H_m` (Sylvester, unnormalised) over the last dim, `m` a power of two."""
    lead, m = y.shape[:-1], y.shape[-1]
    h = 1
    while h < m:
        # One butterfly per bit of the channel index: pairs (i, i + h) -> (a + b, a - b).
        y = y.reshape(*lead, m // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(*lead, m)


def rotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    """`x @ rotation_matrix(n, seed)` over the last dimension, in x's dtype and device.

    Signs and `1/sqrt(n)` are applied first so intermediate values never exceed
    the magnitude of the orthonormal result (matters for float16).
    """
    n = x.shape[-1]
    p, pow2 = _split_order(n)
    scale, dense = _rotation_parts(n, seed, x.dtype, x.device)
    y = _fwht((x * scale).reshape(*x.shape[:-1], p, pow2))
    if dense is not None:
        # [p, 2^k] -> H_p^T [p, 2^k]; written as a right matmul so batch dims fold into rows.
        y = (y.transpose(-1, -2) @ dense).transpose(-1, -2)
    return y.reshape(x.shape)


def rotate_transpose(x: torch.Tensor, seed: int) -> torch.Tensor:
    """`x @ rotation_matrix(n, seed).T` over the last dimension, in x's dtype and device: the inverse of
    :func:`rotate` (R is orthogonal), which a gradient through `x @ R` needs.

    `R^T = H_n^T diag(signs) / sqrt(n)` with `H_n^T = H_p^T kron H_(2^k)` (Sylvester's matrix is symmetric):
    the same FWHT, the dense factor transposed, and the signs last. `1/sqrt(n)` is applied first so that
    intermediate values never exceed the magnitude of the result (float16)."""
    n = x.shape[-1]
    p, pow2 = _split_order(n)
    scale, dense = _rotation_parts(n, seed, x.dtype, x.device)
    y = _fwht((x * scale.abs()).reshape(*x.shape[:-1], p, pow2))
    if dense is not None:
        # [p, 2^k] -> H_p [p, 2^k]
        y = (y.transpose(-1, -2) @ dense.T).transpose(-1, -2)
    return y.reshape(x.shape) * scale.sign()


def rotate_kernel_order(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The rotation of :func:`rotate`, rounded as the fused Triton quantization kernel rounds it: its bit-exact
    reference (`kernels/triton_quant.py`).

    The kernel applies the dense factor `H_p` first, as a sequential fp32 sum over the `p` axis in index order
    (rounded to x's dtype once), then the same FWHT as :func:`rotate`. For `p = 1` (power-of-two orders) this is
    :func:`rotate` exactly; otherwise it differs from it (a matmul, order unspecified) by float rounding only.
    """
    n = x.shape[-1]
    p, pow2 = _split_order(n)
    scale, dense = _rotation_parts(n, seed, x.dtype, x.device)
    y = (x * scale).reshape(*x.shape[:-1], p, pow2)
    if dense is not None:
        y = _dense_kernel_order(y, dense)
    return _fwht(y).reshape(x.shape)


def _dense_kernel_order(y: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """`out[..., a, :] = sum_c H_p[c, a] y[..., c, :]` for `y [..., p, 2^k]`: a sequential sum in the kernels'
    fp32 accumulator (float64 stays float64) over c ascending from +0, rounded to y's dtype once.

    `H_p` holds +-1, so each product is exact and `addcmul_` (fused or not) rounds as `acc + H_p[c, a] y[c]`.
    Runs over blocks of rows so that the accumulator stays in cache across the p steps."""
    wide = torch.promote_types(y.dtype, torch.float32)
    h = dense.to(wide)[:, :, None]  # [c, a, 1]
    rows = y.reshape(-1, *y.shape[-2:])
    out = torch.empty(rows.shape, dtype=y.dtype, device=y.device)
    block = max(1, (1 << 16) // rows[0].numel())  # about 256 KiB of fp32 accumulator
    for r in range(0, rows.shape[0], block):
        part = rows[r : r + block].to(wide)
        acc = torch.zeros(part.shape, dtype=wide, device=y.device)
        for c in range(dense.shape[0]):
            acc.addcmul_(h[c], part[:, c : c + 1, :])
        out[r : r + block] = acc
    return out.reshape(y.shape)


def rotation_factors(n: int, seed: int, dtype: torch.dtype, device: torch.device):
    """`(pow2, scale, dense)` with `n = p * pow2`: the input scale `signs / sqrt(n)` `[n]` in `dtype` and
    `H_p` `[p, p]` (None for `p = 1`). What a kernel needs to rotate in :func:`rotate_kernel_order`'s order."""
    _, pow2 = _split_order(n)
    scale, dense = _rotation_parts(n, seed, dtype, torch.device(device))
    return pow2, scale, dense


def check_order(n: int) -> None:
    """Raise the ValueError of :func:`hadamard_matrix` if no Hadamard matrix of order `n` can be built."""
    _split_order(n)


def rotatable(n: int) -> bool:
    """Whether a Hadamard rotation of order `n` can be built (see :func:`check_order`)."""
    try:
        _split_order(n)
    except ValueError:
        return False
    return True
