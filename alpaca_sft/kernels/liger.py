"""Liger's kernels as the recipes were measured with them."""

from __future__ import annotations

import os


def pin_liger_rope_to_triton() -> None:
    """Keep Liger's Triton RoPE, the kernel this recipe was measured with.

    Liger 0.8.5 picks its CuTe DSL RoPE instead on Hopper whenever nvidia-cutlass-dsl is importable,
    which flash-attn-4 installs. On an H100 that made the recipe's micro-batch take 1,166 ms for the
    same 740 ms of GPU work (745 ms with the Triton RoPE): the whole step waited on the host
    (bench/RESULTS.md). Liger's own per-op setting pins it; a LIGER_KERNEL_IMPL_ROPE the user set wins."""
    try:
        from liger_kernel.backends import all_impls
    except ImportError:  # a Liger without per-op dispatch has only its Triton kernels
        return
    if "nvidia-triton" in all_impls("rope"):
        os.environ.setdefault("LIGER_KERNEL_IMPL_ROPE", "nvidia-triton")
