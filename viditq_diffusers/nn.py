"""`ViDiTQLinear`: the one quantized layer. Frozen tensors only (no trainable weight); `forward` calls the kernels."""

from __future__ import annotations

import torch
from torch import nn

from .kernels import linear_reference
from .kernels.ops import linear as quantized_linear_op
from .quant.channel_balance import balance_activation, balance_weight, unbalance_weight
from .layer_spec import LayerSpec
from .quant.formats import check_bits, dequantize_weight, pack_int4, quantize_weight, unpack_int4


class ViDiTQLinear(nn.Module):
    """A linear layer with integer weights and (for A8) dynamically quantized activations.

    State (what `state_dict` / safetensors hold):
    - `qweight`: int8 codes `[out, in]` for W8; for W4, uint8 `[out, ceil(in/2)]` holding two
      codes per byte (low nibble first, stored as code + 8);
    - `weight_scale`: fp32 scales `[out, G]` (G = 1 per-channel, else `in // group_size`),
      stored as their int32 bit patterns. Loaders (diffusers' `torch_dtype`, `.to(dtype)`,
      ComfyUI casts) cast floating tensors; an integer tensor is never cast, so the scales a
      checkpoint was saved with are exactly the scales it reloads with;
    - `weight_zero`: int8 zero points `[out, G]`, only for asymmetric weights;
    - `bias`: a floating-point parameter, as in `nn.Linear`;
    - `act_smooth`: fp32 smoothing factors `[in]` as int32 bit patterns, only for smoothed layers;
      with `rotation_seed` (plan data, not a tensor) this is the static-dynamic channel balancing:
      the layer computes `Q(x diag(m) R) Q(W diag(1/m) R)^T` (see `quant/channel_balance.py`);
    - `weight`: an empty tensor in the layer's compute dtype. It keeps `layer.weight.dtype`
      meaningful for diffusers code that reads it, and a loader that does not know ViDiT-Q
      (a plain `nn.Linear`, diffusers without the quantization_config) fails on its shape
      instead of loading int codes into a float weight.

    All but `weight` are frozen parameters (`requires_grad=False`), as other backends store their quantized
    weights: accelerate's device-map hooks offload (to CPU or disk) the parameters of a module, never its
    buffers, so integer buffers would stay resident or fail to load. Assigning a tensor to one of these
    names wraps it (`__setattr__`). The empty `weight` stays a buffer: ComfyUI patches (LoRA) every
    parameter named `weight` through the module's `set_weight`, which here means something else, and a
    weight patch on a quantized layer must reach the node pack's refusal instead.
    """

    STATE = ("qweight", "weight_scale", "weight_zero", "act_smooth", "early_qweight", "early_weight_scale",
             "early_weight_zero")

    def __init__(self, spec: LayerSpec, device=None, dtype=None):
        super().__init__()
        if not spec.decided:
            raise ValueError(f"the plan entry's smooth_alpha is still {spec.smooth_alpha!r}: decide it from the "
                             f"layer's weight first (recipe.decide_layer, as convert.quantized_layer does)")
        check_bits(spec.weight_bits, "weight_bits")
        if spec.early_weight_bits is not None:
            check_bits(spec.early_weight_bits, "early_weight_bits")
        if spec.act_bits != 16:
            check_bits(spec.act_bits, "act_bits")
        if spec.group_size is not None and (spec.group_size <= 0 or spec.in_features % spec.group_size):
            raise ValueError(
                f"group_size={spec.group_size} does not divide in_features={spec.in_features}; "
                f"pick a divisor of {spec.in_features} or group_size=None (per-channel)."
            )
        # The plan entry: bits, groups, symmetry; the naive baseline's one weight scale per tensor and static
        # activation scale; the rotation seed; timestep-wise precision (while the model's timestep input is >=
        # early_timestep, a second copy of the weight at early_weight_bits is used: same balancing, same bias).
        self.spec = spec
        self.clock = None  # set by install_clock (timestep-wise layers)
        # a buffer (see below), never on the meta device: it holds nothing, and accelerate's offload hooks move a
        # module's buffers as they are (a meta one has no value to move)
        on = "cpu" if device is not None and torch.device(device).type == "meta" else device
        self.register_buffer("weight", torch.empty(0, device=on, dtype=dtype))
        for prefix, bits in (("", spec.weight_bits), ("early_", spec.early_weight_bits)):
            if bits is None:
                continue
            qweight, scale, zero = self._empty_weight(bits, device)
            setattr(self, f"{prefix}qweight", qweight)
            setattr(self, f"{prefix}weight_scale", scale)
            setattr(self, f"{prefix}weight_zero", zero)
        self.act_smooth = (torch.empty(spec.in_features, dtype=torch.int32, device=device) if spec.smoothed
                           else None)
        # frozen, as the codes (a LoRA trains beside the layer, not the layer); made trainable, it gets its gradient
        self.bias = (nn.Parameter(torch.empty(spec.out_features, device=device, dtype=dtype), requires_grad=False)
                     if spec.bias else None)

    def __setattr__(self, name, value):
        if name in self.STATE and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        super().__setattr__(name, value)

    # the plan entry's fields, read by the kernels' callers, LoRA and the apps
    in_features = property(lambda self: self.spec.in_features)
    out_features = property(lambda self: self.spec.out_features)
    weight_bits = property(lambda self: self.spec.weight_bits)
    act_bits = property(lambda self: self.spec.act_bits)
    group_size = property(lambda self: self.spec.group_size)
    symmetric = property(lambda self: self.spec.symmetric)
    weight_per_tensor = property(lambda self: self.spec.weight_per_tensor)
    act_scale = property(lambda self: self.spec.act_scale)
    rotation_seed = property(lambda self: self.spec.rotation_seed)
    early_weight_bits = property(lambda self: self.spec.early_weight_bits)
    early_timestep = property(lambda self: self.spec.early_timestep)

    def _empty_weight(self, bits: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Empty (codes, scales as int32 bits, zero points or None) tensors for `bits`-bit weights."""
        groups = self.in_features // self.group_size if self.group_size else 1
        rows = 1 if self.weight_per_tensor else self.out_features
        if bits == 4:
            qweight = torch.empty(self.out_features, (self.in_features + 1) // 2, dtype=torch.uint8, device=device)
        else:
            qweight = torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=device)
        zero = None if self.symmetric else torch.empty(rows, groups, dtype=torch.int8, device=device)
        return qweight, torch.empty(rows, groups, dtype=torch.int32, device=device), zero

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LayerSpec, smoothing: torch.Tensor | None = None,
                    name: str = "") -> "ViDiTQLinear":
        """Quantize a float `nn.Linear` as `spec` says (weights quantized exactly once); `smoothing`: the
        smoothing factors of a smoothed spec. `name` is for error messages."""
        weight = linear.weight.detach()
        layer = cls(spec, device=weight.device, dtype=weight.dtype)
        layer.set_weight(weight, name, smoothing)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def set_weight(self, weight: torch.Tensor, name: str = "", smoothing: torch.Tensor | None = None) -> None:
        """Quantize `weight` (the original float weight) into this layer's tensors, balancing it first if the
        spec says so (`smoothing`: its smoothing factors). `name` is for the error message."""
        if not torch.isfinite(weight).all():
            raise ValueError(
                f"layer '{name}' has NaN or Inf in its weight; fix the checkpoint or keep the layer "
                f"in floating point with modules_to_not_convert=['{name}']."
            )
        if (smoothing is None) != (self.act_smooth is None):
            raise ValueError(f"layer '{name}': smoothing factors must be given exactly when the spec is smoothed")
        dtype = weight.dtype
        if smoothing is not None:
            self.act_smooth = smoothing.to(device=weight.device, dtype=torch.float32).contiguous().view(torch.int32)
        if self.is_balanced:
            # transform in float64 and quantize the result directly: one rounding, no detour through fp16
            weight = balance_weight(weight.double(), self.smoothing(), self.rotation_seed)
        self.weight = torch.empty(0, dtype=dtype, device=weight.device)
        for prefix, bits in (("", self.weight_bits), ("early_", self.early_weight_bits)):
            if bits is None:
                continue
            codes, scale, zero = quantize_weight(weight, bits, self.group_size, self.symmetric, self.weight_per_tensor)
            setattr(self, f"{prefix}qweight", pack_int4(codes) if bits == 4 else codes)
            setattr(self, f"{prefix}weight_scale", scale.view(torch.int32))
            if zero is not None:
                setattr(self, f"{prefix}weight_zero", zero)

    def stored_weight(self, early: bool = False) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor | None]:
        """(stored codes, bits, fp32 scales, zero points) of the main copy, or of the timestep-wise early one."""
        prefix, bits = ("early_", self.early_weight_bits) if early else ("", self.weight_bits)
        return (getattr(self, f"{prefix}qweight"), bits, self._float_bits(f"{prefix}weight_scale"),
                getattr(self, f"{prefix}weight_zero"))

    def active_weight(self) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor | None]:
        """`stored_weight` of the copy in use now: the early one while the clock's timestep is >=
        early_timestep, else the main one."""
        t = None if self.clock is None else self.clock.timestep
        return self.stored_weight(self.early_weight_bits is not None and t is not None and t >= self.early_timestep)

    def codes(self) -> torch.Tensor:
        """int8 codes `[out, in]` (unpacked for W4)."""
        return unpack_int4(self.qweight, self.in_features) if self.weight_bits == 4 else self.qweight

    def scales(self) -> torch.Tensor:
        """fp32 weight scales `[out, G]` (a view, no copy)."""
        return self._float_bits("weight_scale")

    @property
    def is_balanced(self) -> bool:
        return self.act_smooth is not None or self.rotation_seed is not None

    def smoothing(self) -> torch.Tensor | None:
        """fp32 smoothing factors `[in]` (a view), or None."""
        return None if self.act_smooth is None else self._float_bits("act_smooth")

    def _float_bits(self, name: str) -> torch.Tensor:
        """The fp32 values a tensor stores as int32 bit patterns (a view). A cast of it (e.g. a training recipe's
        `param.data = param.data.float()` over every 1-D parameter) turned the bit patterns into numbers: refused,
        never read as scales."""
        tensor = getattr(self, name)
        if tensor.dtype != torch.int32:
            raise ValueError(f"ViDiTQLinear.{name} is {tensor.dtype}, not the int32 bit patterns of its fp32 values: "
                             f"something cast the layer's integer tensors (e.g. `param.data = param.data.float()` "
                             f"over model.parameters()), which changes its numbers. Cast only floating-point "
                             f"parameters (`if param.is_floating_point()`), and reload the model.")
        return tensor.view(torch.float32)

    def dequantized_weight(self, early: bool = False, float64: bool = False) -> torch.Tensor:
        """The float weight `[out, in]` this layer stands for, in the ORIGINAL input basis (balancing undone):
        of the main codes, or of the timestep-wise early copy (`early`); in float64 on request (`float64`, so
        a caller can add to it before any further rounding)."""
        qweight, bits, scale, zero = self.stored_weight(early)
        codes = unpack_int4(qweight, self.in_features) if bits == 4 else qweight
        weight = dequantize_weight(codes, scale, zero)
        weight = weight.double() if float64 else weight
        return unbalance_weight(weight, self.smoothing(), self.rotation_seed) if self.is_balanced else weight

    def balance(self, x: torch.Tensor) -> torch.Tensor:
        """The online half of channel balancing: `x diag(m) R` (identity for unbalanced layers)."""
        return balance_activation(x, self.smoothing(), self.rotation_seed) if self.is_balanced else x

    def _act_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.act_scale is None else torch.tensor(self.act_scale, dtype=torch.float32, device=x.device)

    def _apply_2d(self, x: torch.Tensor, fn) -> torch.Tensor:
        if not x.is_floating_point():  # nn.Linear refuses these too; the kernels would return integers
            raise TypeError(f"ViDiTQLinear expects a floating-point input (float32, bfloat16 or float16), got "
                            f"{x.dtype}; cast it first, e.g. x.float()")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ViDiTQLinear expects {self.in_features} input features, got shape {tuple(x.shape)}")
        y = fn(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qweight, bits, scale, zero = self.active_weight()
        return self._apply_2d(
            x, lambda x2: quantized_linear_op(
                x2, qweight, bits, scale, zero, self.bias, self.act_bits, self._act_scale(x2), self.smoothing(),
                self.rotation_seed,
            )
        )

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float64 fake-quant reference of `forward` (tests and debugging)."""
        qweight, bits, scale, zero = self.active_weight()
        codes = unpack_int4(qweight, self.in_features) if bits == 4 else qweight
        return self._apply_2d(
            x, lambda x2: linear_reference(
                self.balance(x2), codes, scale, zero, self.bias, self.act_bits, self._act_scale(x2),
            )
        )

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight state (codes, scales, zero points, early copies; bias excluded)."""
        early = (self.early_qweight, self.early_weight_scale, self.early_weight_zero) if self.early_weight_bits else ()
        tensors = (self.qweight, self.weight_scale, self.weight_zero, self.act_smooth, *early)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        group = f"group_size={self.group_size}" if self.group_size else "per-channel"
        group = "per-tensor" if self.weight_per_tensor else group
        if self.act_scale is not None:
            group += f", static act_scale={self.act_scale:.3g}"
        kind = "sym" if self.symmetric else "asym"
        if self.act_smooth is not None:
            kind += ", smoothed"
        if self.rotation_seed is not None:
            kind += f", rotated (seed {self.rotation_seed})"
        if self.early_weight_bits is not None:
            kind += f", W{self.early_weight_bits} while timestep >= {self.early_timestep:g}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"W{self.weight_bits}A{self.act_bits}, {group}, {kind}"
        )
