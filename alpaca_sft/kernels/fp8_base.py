"""A frozen base in FP8: LoRA training with the base's linear layers' GEMMs in e4m3 on Hopper.

The frozen weights are quantized once, at load, in the two layouts cuBLAS' FP8 GEMM needs (the
second operand column-major): W as it is, with one scale per output channel, for the forward
x W^T; and W^T, with one scale per input channel, for the input gradient g W. Together they take
the memory of the bf16 weight they replace. No weight gradient is ever computed for them. Each GEMM's
other operand, the layer input in forward and the output gradient in backward, is quantized per row
by one Triton kernel (amax, scale and cast in a single read of the tensor); q, k and v, and gate
and up, read the same input, which is quantized once for them. LoRA's A and B (bf16 math, fp32
weights), the norms, the embeddings and the LM head stay as in the bf16 recipe.

Two settings trade some of the speed for closeness to the bf16 base (quantize_frozen_base's arguments):
which adapted layers go to FP8 (`fp8_layers`: the others keep their bf16 weights and GEMMs), and whether the
FP8 layers' input gradient runs in e4m3 or against the bf16 weight, kept for it beside the forward's e4m3 copy
(`fp8_input_grad`). On the real Gemma-3-270m base, e4m3's rounding of the weights made most of the first step's
loss error, and the MLP's layers most of that (bench/RESULTS.md).

On CPUs and pre-Hopper GPUs torch's FP8 GEMM is either missing or emulated, so training refuses
there (fp8_gemm_problem, below); the math runs on the CPU only for tests and for measuring an adapter's gap.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .fused_lora import lora_gradients, save_for_lora_backward
from .shared_input import input_cache, read_after

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448

# cuBLAS's fast accumulation for FP8 GEMMs keeps partial sums in the tensor cores' own precision instead of
# promoting them to fp32 along K. torchao's float8 training uses it in the forward GEMM only; here both GEMMs
# use it, as measured (bench/RESULTS.md): a layer's output error 5.48% (e4m3's own rounding) -> 5.49%; on the
# real pretrained base the first step's LoRA gradients have a cosine of 0.959 with fp32's with both GEMMs fast,
# 0.966 with neither, 0.960 with bf16's with the forward alone fast (bf16's own: 0.9994 with fp32's); an H200
# micro-batch of the FP8 recipe takes 460 ms instead of 483 with the forward alone fast.
FAST_ACCUMULATION_FORWARD = True
FAST_ACCUMULATION_INPUT_GRAD = True


def fp8_gemm_problem(use_cpu: bool = False) -> str | None:
    """Why this machine cannot run FP8 GEMMs with row-wise scales at speed, or None: they need Hopper's
    (or a newer GPU's) FP8 tensor cores; elsewhere torch has no such kernel or emulates it."""
    if use_cpu or not torch.cuda.is_available():
        return "this machine has no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (9, 0):
        return f"this GPU ({torch.cuda.get_device_name()}) has compute capability {major}.{minor}"
    return None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows x columns) as e4m3 values and one fp32 scale per row, x ~= q * scale: each row's
    largest magnitude maps to e4m3's largest value, so nothing saturates and small rows keep their
    precision."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / E4M3_MAX  # an all-zero row gets zeros, not NaNs
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # the clamp: x / scale may round past 448
    return q, scale


@functools.cache
def row_quantizer():
    """A Triton kernel that quantizes whole rows in registers, read once: amax, scale and e4m3 values of
    each row computed where it was loaded (16,384 columns at most: Mistral's widest is 14,336), several
    narrow rows per program. Torch's eager ops take four passes and an fp32 copy; Inductor's kernel for
    quantize_rows reads each row twice (bench/RESULTS.md: 1.2x the layer time of this one)."""
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, rows, columns, x_row_stride, E4M3_MAX: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK)
        inside = (r[:, None] < rows) & (c[None, :] < columns)
        x = tl.load(x_ptr + r[:, None] * x_row_stride + c[None, :], mask=inside, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / E4M3_MAX
        q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -E4M3_MAX, E4M3_MAX)  # div_rn: IEEE division, as torch's
        tl.store(q_ptr + r[:, None] * columns + c[None, :], q.to(tl.float8e4nv), mask=inside)
        tl.store(scale_ptr + r, scale, mask=r < rows)

    def quantize(x: torch.Tensor, elements_per_program: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        if x.stride(-1) != 1:
            x = x.contiguous()
        rows, columns = x.shape
        block = triton.next_power_of_2(columns)
        if block > 16384:  # wider than any Mistral layer: not worth a second kernel
            return quantize_rows(x)
        rows_per_program = max(1, elements_per_program // block)
        q = torch.empty(rows, columns, dtype=E4M3, device=x.device)
        scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
        quantize_rows_kernel[(triton.cdiv(rows, rows_per_program),)](
            x, q, scale, rows, columns, x.stride(0), E4M3_MAX=E4M3_MAX, ROWS=rows_per_program, BLOCK=block,
            num_warps=max(4, min(32, rows_per_program * block // 512)))
        return q, scale

    return quantize


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows for a layer input or output gradient (rows x columns): on a GPU by one Triton
    kernel, the same numbers; eager on the CPU."""
    return row_quantizer()(x) if x.is_cuda else quantize_rows(x)


@functools.cache
def _low_rank_adder():
    """A Triton kernel for C += A B with A tall and thin (tokens x r) and B r x N: one pass over C, which
    is all the work (r is 16). cuBLAS's beta=1 GEMM for it ran at ~70% of the memory bandwidth."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_low_rank_kernel(c_ptr, a_ptr, b_ptr, rows, columns, RANK: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, RANK)
        a = tl.load(a_ptr + m[:, None] * RANK + k[None, :], mask=m[:, None] < rows, other=0.0)
        b = tl.load(b_ptr + k[:, None] * columns + n[None, :], mask=n[None, :] < columns, other=0.0)
        inside = (m[:, None] < rows) & (n[None, :] < columns)
        c_ptrs = c_ptr + m[:, None] * columns + n[None, :]
        c = tl.load(c_ptrs, mask=inside, other=0.0)
        tl.store(c_ptrs, tl.dot(a, b, acc=c.to(tl.float32)).to(c_ptr.dtype.element_ty), mask=inside)

    def add(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        rows, columns = c.shape
        a, b = a.contiguous(), b.contiguous()
        grid = (triton.cdiv(rows, 128), triton.cdiv(columns, 128))
        add_low_rank_kernel[grid](c, a, b, rows, columns, RANK=a.shape[1], BLOCK_M=128, BLOCK_N=128, num_warps=8)
        return c

    return add


def add_low_rank_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c += a @ b in place (a: tokens x r, b: r x N), returning c."""
    rank = a.shape[1]
    if c.is_cuda and c.is_contiguous() and rank in (16, 32, 64, 128) and a.dtype == b.dtype == c.dtype:
        return _low_rank_adder()(c, a, b)
    return c.addmm_(a, b)


def fp8_matmul(q: torch.Tensor, scale: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
               fast_accumulation: bool = False) -> torch.Tensor:
    """(q * scale) @ (weight_q * weight_scale)^T in bf16: q is rows x K, weight_q N x K (row-major,
    so its transpose is the column-major operand the GEMM wants), weight_scale 1 x N."""
    return torch._scaled_mm(q, weight_q.t(), scale_a=scale, scale_b=weight_scale, out_dtype=torch.bfloat16,
                            use_fast_accum=fast_accumulation)


def _quantized_input(x: torch.Tensor, x2: torch.Tensor, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x's rows (x2) quantized, or as the FP8 layer before quantized them for this one (q for k and v, gate for up:
    kernels/shared_input.py); left for the next if `keep`, that is if a sibling in FP8 reads x next."""
    quantized = input_cache.take(x, Fp8FrozenLinear)
    if quantized is None:
        quantized = quantize_activation(x2)
    if keep:
        input_cache.leave(x, Fp8FrozenLinear, quantized)
    return quantized


class Fp8FrozenLinear(nn.Module):
    """A frozen nn.Linear, its weight held in e4m3 (a bias, as Qwen2's q/k/v have, stays bf16 and is added to
    the GEMM's output). With input_grad "bf16" the input gradient is computed against the bf16 weight, kept for
    it instead of the second e4m3 layout (1.5x the bf16 weight's memory in all). The weights are plain
    attributes, not parameters or buffers: DDP would broadcast buffers from rank 0 at every step (each process
    quantizes the same weights to the same bytes), and no checkpoint should hold them. They are made where the
    bf16 weight is, and Module.to() does not move them."""

    def __init__(self, linear: nn.Linear, input_grad: str = "fp8"):
        super().__init__()
        weight = linear.weight.detach()
        self.bias = linear.bias.detach() if linear.bias is not None else None
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_q, scale = quantize_rows(weight)  # N x K, one scale per output channel
        self.weight_scale = scale.t().contiguous()  # 1 x N: scales the GEMM's output columns
        self.weight_bf16 = self.weight_t_q = self.weight_t_scale = None
        if input_grad == "bf16":
            self.weight_bf16 = weight
        else:
            weight_t_q, scale_t = quantize_rows(weight.t())  # K x N, one scale per input channel
            self.weight_t_q, self.weight_t_scale = weight_t_q.contiguous(), scale_t.t().contiguous()
        self.input_read_again = False  # set by quantize_frozen_base: a sibling in FP8 reads this layer's input next

    @staticmethod
    def can_hold(module: nn.Module) -> bool:
        """A frozen bf16 nn.Linear whose sizes FP8 GEMMs take (multiples of 16)."""
        return (type(module) is nn.Linear and not module.weight.requires_grad
                and (module.bias is None or not module.bias.requires_grad)
                and module.weight.dtype == torch.bfloat16
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the forward GEMM uses, in fp32 (for tests and references)."""
        return self.weight_q.float() * self.weight_scale.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the base alone: PEFT's forward for a disabled adapter
        return _Fp8LoraLinear.apply(x, self, None, None, 0.0)

    def forward_with_lora(self, x: torch.Tensor, lora_a, lora_b, scale: float) -> torch.Tensor:
        """The base and one LoRA adapter in one function: what kernels/fused_lora.py calls for this layer."""
        return _Fp8LoraLinear.apply(x.to(torch.bfloat16), self, lora_a, lora_b, scale)

    def extra_repr(self) -> str:
        input_grad = "e4m3" if self.weight_bf16 is None else "bf16"
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight=e4m3 (per-channel scales), "
                f"input gradient against the {input_grad} weight")


class _Fp8LoraLinear(torch.autograd.Function):
    """x W^T + scale * (x A^T) B^T with W in e4m3, and the gradients of x, A and B (none for W).
    Without LoRA weights, the frozen layer alone."""

    @staticmethod
    def forward(ctx, x, base: Fp8FrozenLinear, lora_a, lora_b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        q, q_scale = _quantized_input(x, x2, keep=base.input_read_again)
        out = fp8_matmul(q, q_scale, base.weight_q, base.weight_scale, FAST_ACCUMULATION_FORWARD)
        if base.bias is not None:
            out.add_(base.bias)
        ctx.base, ctx.x_shape, ctx.has_lora = base, x.shape, lora_a is not None
        if ctx.has_lora:
            a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
            xa = x2 @ a.t()
            add_low_rank_(out, xa, (b * scale).t())  # the rank-r product onto the FP8 GEMM's output
            save_for_lora_backward(ctx, x, x2, xa, a, b, lora_a, lora_b, scale)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        base, grad_x = ctx.base, None
        if not ctx.has_lora:
            if ctx.needs_input_grad[0]:
                grad_x = _input_grad(base, grad_out.reshape(-1, grad_out.shape[-1])).view(ctx.x_shape)
            return grad_x, None, None, None, None
        g, grad_xa, a, grad_a, grad_b = lora_gradients(ctx, grad_out)
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(base, g, grad_xa, a).view(ctx.x_shape)
        return grad_x, None, grad_a, grad_b, None


def _input_grad(base: Fp8FrozenLinear, g: torch.Tensor, grad_xa=None, a=None) -> torch.Tensor:
    """g W for output-gradient rows g, plus LoRA's (g B scale) A where given: through the FP8 copy of W^T, or
    with the bf16 weight in a bf16 GEMM that accumulates onto LoRA's rank-r product (beta=1), as the bf16
    recipe's does."""
    if base.weight_bf16 is not None:
        return g @ base.weight_bf16 if grad_xa is None else (grad_xa @ a).addmm_(g, base.weight_bf16)
    gq, g_scale = quantize_activation(g)
    grad_x = fp8_matmul(gq, g_scale, base.weight_t_q, base.weight_t_scale, FAST_ACCUMULATION_INPUT_GRAD)
    return grad_x if grad_xa is None else add_low_rank_(grad_x, grad_xa, a)


def quantize_frozen_base(model: nn.Module, layers: list[str] | None = None, input_grad: str = "fp8") -> int:
    """Put the LoRA-adapted frozen bf16 linear layers of `model` (a PEFT model, on its device) named in
    `layers` (by the last part of their names: q_proj, down_proj; None: every one) in FP8, their input
    gradients in `input_grad` ("fp8" or "bf16"), freeing each bf16 weight as it goes where input_grad is
    "fp8" (the peak never holds both); returns how many. Layers without an adapter (the LM head) keep theirs."""
    from peft.tuners.lora import LoraLayer

    chosen = {name: layer for name, layer in model.named_modules()
              if isinstance(layer, LoraLayer) and (layers is None or name.rsplit(".", 1)[-1] in layers)
              and Fp8FrozenLinear.can_hold(layer.base_layer)}
    for layer in chosen.values():
        layer.base_layer = Fp8FrozenLinear(layer.base_layer, input_grad)
    for name, layer in chosen.items():
        # q, k and v (gate and up) read one input one after another: a layer keeps its quantized input for
        # the siblings after it, where one of them is in FP8 too (kept for none, it would outlive its readers)
        layer.base_layer.input_read_again = any(sibling in chosen for sibling in read_after(name))
    if chosen and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the freed bf16 weights, back to the allocator's pool for activations
    return len(chosen)
