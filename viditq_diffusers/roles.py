"""Layer roles: what each linear layer of a diffusers DiT does, so mixed precision can treat families alike.

ViDiT-Q-MP (docs/method.md, section 5) scores a layer group with the metric that group dominates:
cross-attention drives text alignment, FFN and spatial self-attention drive visual quality, temporal
attention drives temporal consistency. A role names such a family; groups are role x block range.

Quantized by default (attention / FFN inside the transformer blocks):

- `self_attn`: `attn1.to_q/k/v/to_out.0`, self-attention over the image or video tokens. Spatial in image
  models and Latte's spatial blocks; full 3-D attention in Wan, CogVideoX (text and video tokens together),
  Allegro, LTX, Sana(Video) (linear attention); also SD3.5's second image attention `attn2`.
- `cross_attn_q`, `cross_attn_kv`, `cross_attn_out`: `attn2` against the text (Wan I2V: also the image
  condition, `attn2.add_k/v_proj`). q reads image tokens, k/v read the condition.
- `ffn_up`, `ffn_down`: the image-token FFN (`ff.net.0.proj` / `ff.net.2`, Wan `ffn.net`, Qwen `img_mlp`).
  Sana(Video) FFNs are convolutions, not linears.
- `temporal_attn`, `temporal_ffn`: Latte's `temporal_transformer_blocks` (attention across frames).
- `joint_attn_image`, `joint_attn_context`: dual-stream (MM-DiT) attention, image side `attn.to_q/k/v/
  to_out.0` and text side `attn.add_q/k/v_proj/to_add_out` (SD3, Flux, HunyuanVideo, Qwen; Mochi's `attn1`).
- `ffn_context`: the text-stream FFN of dual-stream blocks (`ff_context`, Qwen `txt_mlp`).
- `single_attn`, `single_mlp`, `single_out`: single-stream blocks (Flux, HunyuanVideo): `attn.to_q/k/v`,
  `proj_mlp` (FFN up) and the fused `proj_out` (attention out + FFN down in one linear).
- `skip_proj`: HunyuanDiT's long-skip fusion `blocks.N.skip_linear` (second half of the blocks).

Floating point by default (`quantized_by_default` is False, as in `architectures.is_quantized_by_default`):

- `embedder`: timestep / guidance / caption / text / pooled / patch embedders, `context_embedder`
  (HunyuanVideo's token refiner included), `x_embedder`, `img_in`/`txt_in`, LTX `proj_in`.
- `modulation`: adaLN projections of the timestep embedding: per-block `norm*.linear` (DiT's per-block
  `norm1.emb.*` too), Qwen `img_mod`/`txt_mod`, global `adaln_single.linear` / `time_embed.linear`.
- `output`: `proj_out`, DiT's `proj_out_1/2`, `norm_out.linear`.

`ROLE_MAPS[class name]` is an ordered list of (regex, role); a regex is matched against a linear's full module
name with `re.fullmatch`, the first match wins, and inside blocks group 1 is the block index. Classes
without a map fall back to `FALLBACK_PATTERNS` (generic diffusers naming) with a warning.
"""

from __future__ import annotations

import re
import warnings
from enum import Enum
from typing import Iterable, Sequence

from torch import nn

from .architectures import BLOCK_LISTS
from .nn import ViDiTQLinear


class Role(str, Enum):
    SELF_ATTN = "self_attn"
    CROSS_ATTN_Q = "cross_attn_q"
    CROSS_ATTN_KV = "cross_attn_kv"
    CROSS_ATTN_OUT = "cross_attn_out"
    FFN_UP = "ffn_up"
    FFN_DOWN = "ffn_down"
    TEMPORAL_ATTN = "temporal_attn"
    TEMPORAL_FFN = "temporal_ffn"
    JOINT_ATTN_IMAGE = "joint_attn_image"
    JOINT_ATTN_CONTEXT = "joint_attn_context"
    FFN_CONTEXT = "ffn_context"
    SINGLE_ATTN = "single_attn"
    SINGLE_MLP = "single_mlp"
    SINGLE_OUT = "single_out"
    SKIP_PROJ = "skip_proj"
    EMBEDDER = "embedder"
    MODULATION = "modulation"
    OUTPUT = "output"

    def __str__(self) -> str:
        return self.value


FP_ROLES = frozenset({Role.EMBEDDER, Role.MODULATION, Role.OUTPUT})


def quantized_by_default(role: Role | str) -> bool:
    """ViDiT-Q's default: embedders, modulation and the output projection stay FP, the rest is quantized."""
    return Role(role) not in FP_ROLES


# ----------------------------------------------------------------------------------------------- rule pieces

Rules = list[tuple[str, Role]]
_QKVO = r"(to_q|to_k|to_v|to_out\.0)"


def _in(blocks: str, rules: Rules) -> Rules:
    """Rules for linears inside `<blocks>.<i>.`; the block index is group 1."""
    return [(rf"{blocks}\.(\d+)\.(?:{pattern})", role) for pattern, role in rules]


def _top(embedders: str | None, modulation: str | None = None, output: str = r"proj_out|norm_out\.linear") -> Rules:
    """Rules for linears outside the blocks (modulation first: it can share a prefix with an embedder)."""
    rules = [(modulation, Role.MODULATION)] if modulation else []
    rules.append((output, Role.OUTPUT))
    return rules + ([(rf"({embedders})(\..+)?", Role.EMBEDDER)] if embedders else [])


_NORM_MOD = [(r"norm\w*\.(linear\w*|emb\..+)", Role.MODULATION)]  # norm1(.linear|_context.linear_1|.emb.*)
_SELF = [(rf"attn1\.{_QKVO}", Role.SELF_ATTN)]
_CROSS = [
    (r"attn2\.to_q", Role.CROSS_ATTN_Q),
    (r"attn2\.(to_k|to_v|add_k_proj|add_v_proj)", Role.CROSS_ATTN_KV),
    (r"attn2\.to_out\.0", Role.CROSS_ATTN_OUT),
]
_SINGLE = [
    (r"attn\.(to_q|to_k|to_v)", Role.SINGLE_ATTN),
    (r"proj_mlp", Role.SINGLE_MLP),
    (r"proj_out", Role.SINGLE_OUT),
]


def _ffn(name: str = "ff") -> Rules:
    return [(rf"{name}\.net\.0\.proj", Role.FFN_UP), (rf"{name}\.net\.2", Role.FFN_DOWN)]


def _joint(attn: str = "attn", ff_context: str = "ff_context") -> Rules:
    return [
        (rf"{attn}\.{_QKVO}", Role.JOINT_ATTN_IMAGE),
        (rf"{attn}\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)", Role.JOINT_ATTN_CONTEXT),
        (rf"{ff_context}\.net\.(0\.proj|2)", Role.FFN_CONTEXT),
    ]


_T, _S = "transformer_blocks", "single_transformer_blocks"
_PIXART_LIKE = (_in(_T, _SELF + _CROSS + _ffn())
                + _top(r"adaln_single|caption_projection", r"adaln_single\.linear", "proj_out"))
_SANA_LIKE = _in(_T, _SELF + _CROSS) + _top(r"time_embed|caption_projection", r"time_embed\.linear", "proj_out")
_FLUX_LIKE = _in(_T, _NORM_MOD + _joint() + _ffn()) + _in(_S, _NORM_MOD + _SINGLE)

# ----------------------------------------------------------------------------------------------- per class

ROLE_MAPS: dict[str, Rules] = {
    "PixArtTransformer2DModel": _PIXART_LIKE,
    "AllegroTransformer3DModel": _PIXART_LIKE,
    "LatteTransformer3DModel": _PIXART_LIKE + _in("temporal_transformer_blocks", [
        (rf"attn1\.{_QKVO}", Role.TEMPORAL_ATTN), (r"ff\.net\.(0\.proj|2)", Role.TEMPORAL_FFN)]),
    "DiTTransformer2DModel": _in(_T, _NORM_MOD + _SELF + _ffn()) + _top(None, output=r"proj_out_[12]"),
    # SD3.5 (`dual_attention_layers`) adds `attn2`: a second self-attention over the image tokens only.
    "SD3Transformer2DModel": _in(_T, _NORM_MOD + _joint() + [(rf"attn2\.{_QKVO}", Role.SELF_ATTN)] + _ffn())
    + _top(r"time_text_embed|context_embedder"),
    "FluxTransformer2DModel": _FLUX_LIKE + _top(r"time_text_embed|context_embedder|x_embedder"),
    "HunyuanVideoTransformer3DModel": _FLUX_LIKE + _top(r"time_text_embed|context_embedder"),
    "SanaTransformer2DModel": _SANA_LIKE,
    "SanaVideoTransformer3DModel": _SANA_LIKE,
    "HunyuanDiT2DModel": _in("blocks", _NORM_MOD + _SELF + _CROSS + _ffn() + [(r"skip_linear", Role.SKIP_PROJ)])
    + _top(r"text_embedder|time_extra_emb"),
    "QwenImageTransformer2DModel": _in(_T, [(r"(img|txt)_mod\.1", Role.MODULATION)]
                                       + _joint(ff_context="txt_mlp") + _ffn("img_mlp"))
    + _top(r"time_text_embed|img_in|txt_in"),
    # One `attn1` over the concatenated text and video tokens (shared weights): self-attention.
    "CogVideoXTransformer3DModel": _in(_T, _NORM_MOD + _SELF + _ffn())
    + _top(r"patch_embed|time_embedding|ofs_embedding"),
    "WanTransformer3DModel": _in("blocks", _SELF + _CROSS + _ffn("ffn"))
    + _top("condition_embedder", output="proj_out"),
    "LTXVideoTransformer3DModel": _in(_T, _SELF + _CROSS + _ffn())
    + _top(r"proj_in|time_embed|caption_projection", r"time_embed\.linear", "proj_out"),
    # Mochi's dual-stream attention is called `attn1`.
    "MochiTransformer3DModel": _in(_T, _NORM_MOD + _joint("attn1") + _ffn()) + _top("time_embed"),
}

# Generic diffusers naming, for classes without a map. Name alone cannot tell a dual-stream block's image side
# from plain self-attention: `attn.to_*` / `attn1.to_*` are `self_attn`; `attn2` is taken as cross-attention.
_ANY = r"[A-Za-z_]\w*"  # any top-level block list
FALLBACK_PATTERNS: Rules = (
    _in(_ANY, [(r"(.+\.)?(norm\w*\.(linear\w*|emb\..+)|\w+_mod\.\d+|adaLN_modulation\.\d+)", Role.MODULATION)])
    + _in(r"temporal\w*", [(r"attn\d*\..+", Role.TEMPORAL_ATTN), (r"(ff|ffn|mlp)\..+", Role.TEMPORAL_FFN)])
    + _in(_ANY, [(r"\w*temporal\w*\.(.+\.)?(ff|ffn|mlp)\..+", Role.TEMPORAL_FFN),
                 (r"\w*temporal\w*\..+", Role.TEMPORAL_ATTN)])
    + _in(r"single\w*", _SINGLE)
    + _in(_ANY, _CROSS + [
        (rf"attn1?\.{_QKVO}", Role.SELF_ATTN),
        (r"attn1?\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)", Role.JOINT_ATTN_CONTEXT),
        (r"(ff_context|txt_mlp)\..+", Role.FFN_CONTEXT),
        (r"(ff|ffn|mlp|img_mlp)\.(net\.0(\.proj)?|fc1)", Role.FFN_UP),
        (r"(ff|ffn|mlp|img_mlp)\.(net\.2|fc2)", Role.FFN_DOWN),
        (r"skip_linear", Role.SKIP_PROJ),
    ])
    + _top(r"\w*emb\w*|caption_proj\w*|proj_in|\w+_in|adaln_single", r"(adaln_single|time_embed)\.linear",
           r"proj_out(_\d+)?|norm_out\.linear\w*")
)

# ----------------------------------------------------------------------------------------------- functions


def _linears(model: nn.Module) -> Iterable[str]:
    """Names of the linear layers, quantized (`ViDiTQLinear`) or not."""
    return (n for n, m in model.named_modules() if isinstance(m, (nn.Linear, ViDiTQLinear)))


def _match(rules: Rules, name: str) -> Role | None:
    return next((role for pattern, role in rules if re.fullmatch(pattern, name)), None)


def classify(model: nn.Module) -> dict[str, Role]:
    """Role of every linear layer (by module name). Unclassified layers are left out (they stay FP).

    A class without a `ROLE_MAPS` entry uses `FALLBACK_PATTERNS` and warns once; a known class warns only if
    a layer is not covered by its map (an unforeseen variant).
    """
    cls = type(model).__name__
    rules = ROLE_MAPS.get(cls)
    roles, missed = {}, []
    for name in _linears(model):
        role = _match(FALLBACK_PATTERNS if rules is None else rules, name)
        if role is None:
            missed.append(name)
        else:
            roles[name] = role
    if rules is None or missed:
        how = (f"no role map for {cls}; classified by generic name patterns" if rules is None
               else f"the role map for {cls} does not cover every linear layer")
        warnings.warn(
            f"{how}. {len(missed)} linear layer(s) could not be classified and stay in FP: {missed}. "
            f"To fix, add ROLE_MAPS[{cls!r}] = [(regex on the full module name, Role), ...] in "
            f"viditq_diffusers.roles (first match wins).", stacklevel=2)
    return roles


def block_of(name: str) -> tuple[str, int] | None:
    """(block list, index) for a name inside a top-level ModuleList such as `transformer_blocks.3.`."""
    match = re.match(r"([A-Za-z_]\w*)\.(\d+)\.", name)
    return None if match is None else (match.group(1), int(match.group(2)))


def block_index(name: str) -> int | None:
    """Index of the block that holds layer `name` (per block list), None outside the blocks."""
    block = block_of(name)
    return None if block is None else block[1]


def _split(n_blocks: int, n_ranges: int) -> list[tuple[int, int]]:
    """`n_ranges` contiguous (first, last) ranges of nearly equal size (the first ones one longer)."""
    k = max(1, min(n_ranges, n_blocks))
    size, extra = divmod(n_blocks, k)
    starts = [i * size + min(i, extra) for i in range(k + 1)]
    return [(starts[i], starts[i + 1] - 1) for i in range(k)]


def group_layers(model: nn.Module, block_ranges: int | Sequence[tuple[int, int]] = 4) -> dict[str, list[str]]:
    """Group the classified linears by role x block range: `"ffn_down[0-3]" -> [layer names]`.

    `block_ranges`: an int n splits every block list into min(n, length) contiguous ranges of nearly equal
    size; explicit inclusive `(first, last)` ranges apply to every block list and must cover each block.
    Layers outside the blocks are grouped by role alone (`"embedder"`). Indices count per block list; when a
    role occurs in several block lists (only `modulation` in the zoo: Flux/HunyuanVideo single blocks), the
    groups of the non-main lists are prefixed with the list, e.g. `"single_transformer_blocks/modulation[0-1]"`.
    Roles that only exist in one list (`temporal_*`, `single_*`) need no prefix. Groups include FP roles;
    filter with `quantized_by_default`.
    """
    roles = classify(model)
    lists_of_role: dict[Role, list[str]] = {}
    order = list(BLOCK_LISTS.get(type(model).__name__, ()))
    for name, role in roles.items():
        if (block := block_of(name)) is not None:
            lists_of_role.setdefault(role, []).append(block[0])
            order += [block[0]] if block[0] not in order else []
    ranges: dict[str, list[tuple[int, int]]] = {}
    groups: dict[str, list[str]] = {}
    for name, role in roles.items():
        block = block_of(name)
        if block is None:
            groups.setdefault(role.value, []).append(name)
            continue
        lst, index = block
        if lst not in ranges:
            ranges[lst] = (_split(len(model.get_submodule(lst)), block_ranges) if isinstance(block_ranges, int)
                           else [tuple(r) for r in block_ranges])
        first, last = next((r for r in ranges[lst] if r[0] <= index <= r[1]), (None, None))
        if first is None:
            raise ValueError(f"block {lst}.{index} ({name}) is in none of block_ranges={block_ranges}")
        main = min(lists_of_role[role], key=order.index)
        prefix = "" if lst == main else f"{lst}/"
        groups.setdefault(f"{prefix}{role.value}[{first}-{last}]", []).append(name)
    return groups
