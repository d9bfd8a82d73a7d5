"""The paper's reference W4A8-MP heuristic (ViDiT-Q; docs/method.md, section 5), as the `w4a8_mp` preset applies it.

W8 for every FFN linear (image, text-stream and temporal FFNs, and the single-stream blocks' FFN halves,
`proj_mlp` and the fused `proj_out`) and for every linear of the first and last block of each block list;
W4 for the remaining attention linears; A8 everywhere. It is a hand rule, kept as the baseline the
searched plans must beat.
"""

from __future__ import annotations

from torch import nn

from .roles import Role, block_of, classify, quantized_by_default

FFN_ROLES = frozenset({Role.FFN_UP, Role.FFN_DOWN, Role.FFN_CONTEXT, Role.TEMPORAL_FFN, Role.SINGLE_MLP,
                       Role.SINGLE_OUT})


def reference_w8_layers(model: nn.Module) -> set[str]:
    """Names of the quantized-by-default linears the heuristic keeps at 8-bit weights."""
    roles = {name: role for name, role in classify(model).items() if quantized_by_default(role)}
    ends: dict[str, tuple[int, int]] = {}
    for name in roles:
        if (block := block_of(name)) is not None:
            first, last = ends.get(block[0], (block[1], block[1]))
            ends[block[0]] = (min(first, block[1]), max(last, block[1]))
    return {name for name, role in roles.items()
            if role in FFN_ROLES or ((block := block_of(name)) is not None and block[1] in ends[block[0]])}
