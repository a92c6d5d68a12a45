"""8-bit transformer weights: int8 (bitsandbytes LLM.int8, CPU and CUDA) and fp8 e4m3 storage upcast per layer.

`quantize_transformer(model, mode)` replaces the Linear layers of the transformer blocks in place; they hold about 96%
of an XL-2 model's weights. The small embedders (patch, timestep, caption projection, micro-conditions) and the final
layer stay in the model's dtype: they are ~4% of the memory, and the timestep and caption paths feed every block.

- "int8": bitsandbytes `Linear8bitLt` (int8 weights with one fp32 scale per output row; activations above `threshold`
  go through a 16-bit side path, as in LLM.int8). Works on the CPU and on CUDA with bitsandbytes >= 0.45.
- "fp8": weights stored as float8 e4m3 with one scale per output row, converted to the compute dtype for each matmul
  (so any device whose torch has float8 dtypes runs it; there is no fp8 arithmetic involved). Saves memory, not time.
- "int8-dynamic": int8 weights (one scale per output row) times int8 activations (one scale per token, found at run
  time) on torch's own int8 GEMM (`torch._int_mm`: oneDNN/VNNI/AMX on the CPU, cuBLAS on CUDA); the int32 result is
  rescaled in the compute dtype. Saves memory and time (bench/bench_transformer_step.py --int8).
All three take about half of the bf16 weight memory (bench/bench_memory.py measures it on the full-size model).
"""

from __future__ import annotations


import functools

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PixArtError
from .memory import return_freed_memory

MODES = ("none", "int8", "fp8", "int8-dynamic")
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite float8 e4m3fn value


class Fp8Linear(nn.Module):
    """A Linear layer whose weight is kept in float8 e4m3 (one scale per output row) and upcast for each call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        q, scale = _quantize_rows(weight.detach(), FP8_MAX, FP8_DTYPE)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        return (self.weight.to(self.compute_dtype) * self.weight_scale.to(self.compute_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, storage=float8_e4m3fn"


def _quantize_rows(w: torch.Tensor, qmax: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(w / scale in `dtype`, scale): one fp32 scale per output row, the row's largest magnitude mapping to qmax;
    rounded to the nearest integer for an integer dtype. In row blocks: no full-size fp32 temporary."""
    scale = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / qmax
    q = torch.empty(w.shape, dtype=dtype, device=w.device)
    for r in range(0, w.shape[0], 512):
        block = w[r:r + 512].float() / scale[r:r + 512]
        if not dtype.is_floating_point:
            block.round_()
        q[r:r + 512] = block.clamp_(-qmax, qmax).to(dtype)
    return q, scale


@functools.lru_cache(maxsize=None)
def int_mm_available(device_type: str) -> bool:
    """Whether torch's int8 x int8 -> int32 matmul runs on this device kind (a small probe, once per kind)."""
    op = getattr(torch, "_int_mm", None)
    if op is None:
        return False
    try:
        a = torch.ones(32, 32, dtype=torch.int8, device=device_type)
        return bool(op(a, a)[0, 0].item() == 32)
    except (RuntimeError, NotImplementedError, AssertionError):
        return False


def check_mode(mode: str, device_type: str, what: str = "weight quantisation") -> None:
    """Refuse a mode that is unknown, or that this torch cannot run on `device_type`: load_transformer asks before it
    reads any weights (`what` names the option in its message), quantize_transformer before it converts any."""
    if mode not in MODES:
        raise PixArtError(f"Unknown {what} {mode!r}; choose one of: {', '.join(MODES)}.")
    if mode == "fp8" and FP8_DTYPE is None:
        raise PixArtError(f"fp8 weights need float8 support, which this torch ({torch.__version__}) lacks; choose "
                          "int8 (same memory) or update torch to 2.1 or later.")
    if mode == "int8-dynamic" and not int_mm_available(device_type):
        raise PixArtError(f"int8-dynamic needs torch's int8 matrix multiply (torch._int_mm), which this torch "
                          f"({torch.__version__}) does not offer on {device_type}; choose int8 or fp8 (same memory, "
                          "no speed-up) or update torch.")


def _int_mm_fits(m: int, k: int, n: int, device_type: str) -> bool:
    """torch._int_mm's shape rules: none on the CPU; CUDA needs more than 16 rows and K, N multiples of 8."""
    return device_type == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0)


class Int8WeightLinear(nn.Module):
    """A Linear layer with int8 weights (one fp32 scale per output row); the activations keep their dtype (weight-only
    int8: saves memory, not time). T5's `wo` uses it: its inputs are too large for int8 or fp16 activations."""

    ROWS = 256  # weight rows converted at a time: the converted block stays in cache (2.7x faster than all at once)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        q, scale = _quantize_rows(weight.detach(), 127.0, torch.int8)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale.view(-1))
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for r in range(0, self.out_features, self.ROWS):  # int8 -> bf16/fp16/fp32 is exact (|q| <= 127)
            torch.mm(rows, self.weight[r:r + self.ROWS].to(x.dtype).t(), out=out[:, r:r + self.ROWS])
        out.mul_(self.weight_scale.to(x.dtype))  # the row scales, applied to the output columns
        if self.bias is not None:
            out.add_(self.bias.to(x.dtype))
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=int8"


class Int8DynamicLinear(Int8WeightLinear):
    """int8 weights and per-token dynamic int8 activations through torch._int_mm; output in the input's dtype.

    y = (q_x @ q_w^T) * s_x * s_w + b, with q_x = round(x / s_x), s_x = max|x_row| / 127 found for each call.
    Rows are processed in blocks so the fp32 temporaries (quantised input, int32 product, rescaled output) stay in
    cache: on one CPU thread that makes the rescale passes ~3x cheaper than on the whole tensor. Where the kernel's
    shape rules fail (CUDA: K or N not a multiple of 8, 16 rows or fewer) the layer runs weight-only.
    """

    ROWS = 512  # rows per block; measured best of 256..2048 on an AVX512-VNNI CPU at 1024 px

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not _int_mm_fits(rows.shape[0], self.in_features, self.out_features, x.device.type):
            return super().forward(x)
        out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        w_t = self.weight.t()
        bias = None if self.bias is None else self.bias.float()
        for r in range(0, rows.shape[0], self.ROWS):
            xs = rows[r:r + self.ROWS].to(torch.float32, copy=True)  # a copy: quantised in place below
            # max |x| per row as max(max, -min): two plain reductions, ~20x faster than vector_norm(inf) on the CPU
            s_x = torch.maximum(xs.amax(1, keepdim=True), xs.amin(1, keepdim=True).neg_()).clamp_(min=1e-12) / 127.0
            q = xs.div_(s_x).round_().to(torch.int8)
            y = torch._int_mm(q, w_t).float().mul_(s_x).mul_(self.weight_scale)
            out[r:r + self.ROWS] = y if bias is None else y.add_(bias)  # in-place fp32, then one cast
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", activations=int8"


def _int8_linear(linear: nn.Linear, threshold: float) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is in requirements.txt
        raise PixArtError("int8 weights need the bitsandbytes package: pip install bitsandbytes") from e
    device = linear.weight.device
    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False, threshold=threshold, device="meta")
    q.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q.to(device)  # moving the Int8Params to a real device is what quantises them


def block_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute name) of every plain Linear inside the transformer blocks."""
    found = []
    for block in model.blocks:
        for parent in block.modules():
            found += [(parent, name) for name, child in parent.named_children() if type(child) is nn.Linear]
    return found


def quantize_transformer(model: nn.Module, mode: str, *, int8_threshold: float = 6.0) -> nn.Module:
    """Store the block Linear weights of a PixArtTransformer in 8 bits ("int8", "fp8" or "int8-dynamic"); "none"
    leaves it as is.

    The model is changed in place and returned. Call it after loading (any dtype; fp8 computes in the model's dtype,
    int8 and int8-dynamic in the input's). Layer by layer, so the extra memory while converting is one layer.
    """
    check_mode(mode, model.device.type)
    if mode == "none":
        return model
    if getattr(model, "quantization", "none") != "none":
        raise PixArtError(f"This transformer is already quantised ({model.quantization}); load it again to change.")
    compute_dtype = model.dtype
    for parent, name in block_linears(model):  # one layer at a time: the old weight is freed by the setattr
        linear = getattr(parent, name)
        if mode == "fp8":
            new = Fp8Linear(linear.weight, linear.bias, compute_dtype).to(linear.weight.device)
        elif mode == "int8-dynamic":
            new = Int8DynamicLinear(linear.weight, linear.bias, compute_dtype)
        else:
            new = _int8_linear(linear, int8_threshold)
        setattr(parent, name, new)
        del linear
    model.quantization = mode
    return_freed_memory()
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (int8 scales and fp8 storage included)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for m in model.modules():  # bitsandbytes keeps the row scales beside the int8 weight
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        if isinstance(scb, torch.Tensor) and scb.data_ptr() not in seen:
            seen.add(scb.data_ptr())
            total += scb.numel() * scb.element_size()
    return total
