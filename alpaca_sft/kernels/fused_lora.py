"""LoRA's forward and backward with its scale and its add folded into the GEMMs.

PEFT computes an adapted layer as `base(x) + lora_B(lora_A(x)) * scale`: besides two small rank-r
GEMMs, that is three element-wise passes over the layer's whole output in forward (B's product, its
scaled copy, the sum) and one more in backward (the scaled gradient), each a full read and write of a
tokens x out_features tensor. Here, for a frozen bf16 base, the rank-r product is written once and
the base GEMM accumulates onto it (beta=1), and the input gradient likewise; the scale is applied to
rank-r tensors only. For a 4-bit base, whose GEMM is bitsandbytes', the sum and the scale ride in the
epilogue of one GEMM after it. On an H100 (bench/RESULTS.md) LoRA went from 21% of a micro-batch
with PEFT's forward to 11%.

Layers that read one input one after another (q, k and v; gate and up) run as one group on a bf16
base: one rank-r GEMM of x with their A's side by side instead of one each (x read once, not three
times, in forward and again for A's gradients), and one input gradient that every member's GEMMs
accumulate into, instead of one per member that autograd then adds up (two full passes for q/k/v,
one for gate/up). The group's first layer computes every member's output; the others hand back theirs
when called with that same input (the tensor itself, unchanged: kernels/shared_input.py), and otherwise compute
on their own.

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

from .shared_input import SHARED_INPUT_GROUPS, input_cache


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
        _, grad_xa, a, grad_a, grad_b = lora_gradients(ctx, grad_out)
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


class _SharedInputLora(torch.autograd.Function):
    """x W_i^T + scale_i * (x A_i^T) B_i^T for the frozen W_i of layers that read the same x: one
    rank-r GEMM for every A (x A_cat^T, A_cat the A's stacked), and one input gradient
    (g_i B_i scale_i, side by side) A_cat + sum_i g_i W_i, accumulated by the GEMMs themselves."""

    @staticmethod
    def forward(ctx, x, scales, *tensors):
        n = len(scales)
        weights, lora_a, lora_b = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        a_cat = torch.cat([a.to(x.dtype) for a in lora_a])  # (r_1 + ... + r_n) x in_features
        b = [lb.to(x.dtype) for lb in lora_b]
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ a_cat.t()
        ranks = [a.shape[0] for a in lora_a]
        outputs, start = [], 0
        for weight, b_i, scale, rank in zip(weights, b, scales, ranks):
            out = (xa[:, start:start + rank] @ (b_i * scale).t()).addmm_(x2, weight.t())
            outputs.append(out.view(*x.shape[:-1], out.shape[-1]))
            start += rank
        ctx.save_for_backward(x2, xa, a_cat, *b)
        ctx.weights, ctx.scales, ctx.ranks, ctx.x_shape = weights, scales, ranks, x.shape
        ctx.a_dtypes, ctx.b_dtypes = [a.dtype for a in lora_a], [lb.dtype for lb in lora_b]
        ctx.set_materialize_grads(False)  # a member whose output goes unused sends None, not a tensor of zeros
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        x2, xa, a_cat, *b = ctx.saved_tensors  # read once: non-reentrant checkpointing refuses a second read
        grads = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grad_outputs]
        grad_xa, grad_b, start = [], [], 0
        for g, b_i, scale, rank, dtype in zip(grads, b, ctx.scales, ctx.ranks, ctx.b_dtypes):
            if g is None:
                grad_xa.append(xa.new_zeros(xa.shape[0], rank))
                grad_b.append(None)
            else:
                grad_xa.append((g @ b_i).mul_(scale))
                grad_b.append((g.t() @ xa[:, start:start + rank]).mul_(scale).to(dtype))
            start += rank
        grad_xa = torch.cat(grad_xa, dim=1)  # tokens x (r_1 + ... + r_n): small
        grad_a = [part.to(dtype) for part, dtype in zip((grad_xa.t() @ x2).split(ctx.ranks), ctx.a_dtypes)]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_xa @ a_cat
            for g, weight in zip(grads, ctx.weights):
                if g is not None:
                    grad_x.addmm_(g, weight)
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, *([None] * len(ctx.weights)), *grad_a, *grad_b


def _plain_adapter(layer) -> str | None:
    """The one active adapter of a PEFT LoRA layer when this path covers it, else None."""
    adapter = layer.active_adapters[0] if len(layer.active_adapters) == 1 else None
    plain = (
        adapter is not None and not layer.disable_adapters and not layer.merged
        and adapter in layer.lora_A and adapter not in layer.lora_variant
        and isinstance(layer.lora_dropout[adapter], nn.Identity)
    )
    return adapter if plain else None


def _frozen_bf16_linear(layer, x: torch.Tensor) -> bool:
    base = layer.base_layer
    return type(base) is nn.Linear and base.bias is None and not base.weight.requires_grad and x.dtype == base.weight.dtype


def _group_forward(leader, x: torch.Tensor, adapter: str) -> torch.Tensor | None:
    """Every member's output from one _SharedInputLora, the leader's returned and the others' left
    with them for their own call; None where a member is not covered (each layer then runs alone)."""
    members = (leader, *leader.shared_input_siblings)
    if not all(_plain_adapter(m) == adapter and _frozen_bf16_linear(m, x) for m in members):
        return None
    tensors = ([m.base_layer.weight for m in members] + [m.lora_A[adapter].weight for m in members]
               + [m.lora_B[adapter].weight for m in members])
    outputs = _SharedInputLora.apply(x, tuple(m.scaling[adapter] for m in members), *tensors)
    for sibling, output in zip(leader.shared_input_siblings, outputs[1:]):
        input_cache.leave(x, sibling, output)
    return outputs[0]


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's lora.Linear.forward for one plain active adapter, fused; everything else goes to PEFT's."""
    adapter = None if args or kwargs else _plain_adapter(self)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    if (handed := input_cache.take(x, self)) is not None:
        return handed
    base = self.base_layer
    lora_a, lora_b, scale = self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter]
    if hasattr(base, "forward_with_lora"):
        return base.forward_with_lora(x, lora_a, lora_b, scale)
    if _frozen_bf16_linear(self, x):
        if self.shared_input_siblings and (out := _group_forward(self, x, adapter)) is not None:
            return out
        return _LoraLinear.apply(x, base.weight, lora_a, lora_b, scale)
    return _LoraAdd.apply(base(x), x, lora_a, lora_b, scale)  # a 4-bit (or other) base runs its own kernels


def _lora_linear_classes() -> tuple[type, ...]:
    from peft.tuners.lora import Linear

    if not importlib.util.find_spec("bitsandbytes"):  # PEFT's bnb module imports it: only a 4-bit base needs it
        return (Linear,)
    from peft.tuners.lora import bnb

    # QLoRA's layer: PEFT's forward for it also clones the 4-bit base's output, one more full pass.
    return (Linear,) + tuple(c for c in (getattr(bnb, "Linear4bit", None),) if c is not None)


def fuse_lora(model: nn.Module, share_inputs: bool = True) -> int:
    """Route every PEFT LoRA Linear (bf16 or 4-bit base) of `model` through the fused forward, the
    sibling layers of SHARED_INPUT_GROUPS as groups unless share_inputs is false; returns how many layers."""
    classes = _lora_linear_classes()
    layers = [m for m in model.modules() if isinstance(m, classes)]
    for layer in layers:
        layer.forward = types.MethodType(_fused_forward, layer)
        layer.shared_input_siblings = ()
    if share_inputs:
        for parent in model.modules():
            for names in SHARED_INPUT_GROUPS:
                members = [getattr(parent, name, None) for name in names]
                if all(isinstance(m, classes) for m in members):
                    members[0].shared_input_siblings = tuple(members[1:])
    return len(layers)


def shared_input_groups(model: nn.Module) -> int:
    """How many groups of sibling layers fuse_lora formed in `model`."""
    return sum(bool(getattr(m, "shared_input_siblings", ())) for m in model.modules())
