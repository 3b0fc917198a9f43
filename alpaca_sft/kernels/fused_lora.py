"""LoRA's forward and backward with its scale and its add folded into the GEMMs.

PEFT computes an adapted layer as `base(x) + lora_B(lora_A(x)) * scale`: besides two small rank-r
GEMMs, that is three element-wise passes over the layer's whole output in forward (B's product, its
scaled copy, the sum) and one more in backward (the scaled gradient), each a full read and write of a
tokens x out_features tensor. Here, for a frozen bf16 base, the rank-r product is written once and
the base GEMM accumulates onto it (beta=1), and the input gradient likewise; the scale is applied to
rank-r tensors only. For a 4-bit base, whose GEMM is bitsandbytes', the sum and the scale ride in the
epilogue of one GEMM after it. On an H100 (bench/RESULTS.md) LoRA went from 21% of a micro-batch
with PEFT's forward to 11%.

A base that brings its own fused function (`forward_with_lora`: the FP8 base of kernels/fp8_base.py) runs it.

Only the forward is replaced: PEFT still owns the adapter (its weights, their names, saving, loading,
merging), and any layer this path does not cover (dropout, DoRA and other variants, several active
adapters, mixed-adapter batches, merged or disabled adapters) runs PEFT's own forward.
"""

from __future__ import annotations

import importlib.util
import types

import torch
from torch import nn


def lora_gradients(ctx, grad_out):
    """The output gradient as rows, the gradient of x A^T, A (for the input gradient), and A's and B's
    gradients in their own dtypes. ctx.saved_tensors is read here and only here: under non-reentrant
    gradient checkpointing a second read fails."""
    x2, xa, a, b = ctx.saved_tensors
    g = grad_out.reshape(-1, grad_out.shape[-1])
    grad_xa = (g @ b).mul_(ctx.scale)  # tokens x r: the scale costs a rank-r pass, not an out_features one
    grad_b = (g.t() @ xa).mul_(ctx.scale)
    grad_a = grad_xa.t() @ x2
    a_dtype, b_dtype = ctx.weight_dtypes
    return g, grad_xa, a, grad_a.to(a_dtype), grad_b.to(b_dtype)


def save_for_lora_backward(ctx, x, x2, xa, a, b, lora_a, lora_b, scale) -> None:
    """What lora_gradients reads back: shared by every fused layer here and by kernels/fp8_base.py."""
    # x2 is the tensor the base layer saves too (no extra memory); xa is tokens x r.
    ctx.save_for_backward(x2, xa, a, b)
    ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
    ctx.weight_dtypes = (lora_a.dtype, lora_b.dtype)


class _LoraAdd(torch.autograd.Function):
    """base_out + scale * (x A^T) B^T, with the gradients of x, A and B; base_out's gradient is the
    incoming one, handed back to the base layer's own backward."""

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, scale):
        dtype = base_out.dtype  # the bf16 recipe's compute dtype (LoRA's fp32 weights are cast, as autocast does)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        xa = x2 @ a.t()
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), xa, b.t(), alpha=scale)
        save_for_lora_backward(ctx, x, x2, xa, a, b, lora_a, lora_b, scale)
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        g, grad_xa, a, grad_a, grad_b = lora_gradients(ctx, grad_out)
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = (grad_xa @ a).view(ctx.x_shape).to(ctx.x_dtype)
        return grad_out, grad_x, grad_a, grad_b, None


class _LoraLinear(torch.autograd.Function):
    """x W^T + scale * (x A^T) B^T for a frozen W, the adds done by the big GEMMs: LoRA's rank-r
    product is written first and x W^T accumulates onto it (beta=1), the read of it hidden under the
    big GEMM's compute; the input gradient likewise ((g B scale) A, then + g W). Adding the small
    product afterwards instead costs a full read and write of the output, exposed, and an
    out-of-place addmm one more (it copies its input into the result first)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale):
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ a.t()
        out = (xa @ (b * scale).t()).addmm_(x2, weight.t())
        ctx.weight = weight  # frozen: a parameter, never changed in place, so no version check needed
        save_for_lora_backward(ctx, x, x2, xa, a, b, lora_a, lora_b, scale)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        g, grad_xa, a, grad_a, grad_b = lora_gradients(ctx, grad_out)
        grad_x = (grad_xa @ a).addmm_(g, ctx.weight).view(ctx.x_shape)
        return grad_x, None, grad_a, grad_b, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's lora.Linear.forward for one plain active adapter, fused; everything else goes to PEFT's."""
    adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    plain = (
        adapter is not None and not args and not kwargs and not self.disable_adapters and not self.merged
        and adapter in self.lora_A and adapter not in self.lora_variant
        and isinstance(self.lora_dropout[adapter], nn.Identity)
    )
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    lora_a, lora_b, scale = self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter]
    if hasattr(base, "forward_with_lora"):
        return base.forward_with_lora(x, lora_a, lora_b, scale)
    if type(base) is nn.Linear and base.bias is None and not base.weight.requires_grad and x.dtype == base.weight.dtype:
        return _LoraLinear.apply(x, base.weight, lora_a, lora_b, scale)
    return _LoraAdd.apply(base(x), x, lora_a, lora_b, scale)  # a 4-bit (or other) base runs its own kernels


def _lora_linear_classes() -> tuple[type, ...]:
    from peft.tuners.lora import Linear

    if not importlib.util.find_spec("bitsandbytes"):  # PEFT's bnb module imports it: only a 4-bit base needs it
        return (Linear,)
    from peft.tuners.lora import bnb

    # QLoRA's layer: PEFT's forward for it also clones the 4-bit base's output, one more full pass.
    return (Linear,) + tuple(c for c in (getattr(bnb, "Linear4bit", None),) if c is not None)


def fuse_lora(model: nn.Module) -> int:
    """Route every PEFT LoRA Linear (bf16 or 4-bit base) of `model` through the fused forward; returns how many."""
    classes = _lora_linear_classes()
    layers = [m for m in model.modules() if isinstance(m, classes)]
    for layer in layers:
        layer.forward = types.MethodType(_fused_forward, layer)
    return len(layers)
