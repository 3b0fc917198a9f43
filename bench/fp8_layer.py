"""One Mistral-7B decoder layer's seven LoRA-adapted linear layers, forward and backward, at a packed
micro-batch's token count: the bf16 base (the recipe's fused LoRA) against FP8 bases, on one GPU.

    python bench/fp8_layer.py --tokens 12288 --out bench/results/fp8/layer.json

  bf16              the frozen bf16 base, LoRA fused into its GEMMs (recipes/mistral-7b-lora.yaml)
  fp8               this project's FP8 base (alpaca_sft/kernels/fp8_base.py): weights quantized once, inputs
                    and output gradients per row by Triton kernels, no weight gradient
  fp8-precise       the same with every FP8 GEMM accumulating in fp32 (no fast accumulation)
  fp8-fast-accum    the same with fast accumulation in the input-gradient GEMMs too, not only the forward's
  fp8-cublas-add    the same with LoRA's product added by cuBLAS (addmm_, beta=1) instead of the Triton kernel
  fp8-inductor-quant  the same with the row quantization compiled by torch.compile (Inductor) instead
  fp8-eager-quant   the same with the row quantization left to eager torch ops (what fusing it saves)
  torchao           torchao's Float8Linear (row-wise recipe) as the base under PEFT's LoRA, eager
  torchao-compiled  the same, the layer compiled by torch.compile (torchao's intended use)

The layer is the attention and MLP projections as Mistral wires them (q, k, v read the same normed
input, as do gate and up; o reads attention's output, down the SwiGLU's), with the attention and
the norms left out: what differs between the variants is only the linear layers. Also reported: each
variant's relative error of the outputs and of the input gradient against the bf16 base.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

import torch
from torch import nn

from alpaca_sft.kernels import fp8_base
from alpaca_sft.kernels.fp8_base import quantize_frozen_base
from alpaca_sft.kernels.fused_lora import fuse_lora
from harness import argument_parser, device_name, write_results

HIDDEN, KV, INTERMEDIATE = 4096, 1024, 14336


class Projections(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(HIDDEN, HIDDEN, bias=False), nn.Linear(HIDDEN, KV, bias=False), nn.Linear(HIDDEN, KV, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False), nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)

    def forward(self, x, y):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        attention = q + torch.cat([k, v] * 2, dim=-1)  # stands in for attention: q, k and v all reach o
        return self.o_proj(attention), self.down_proj(nn.functional.silu(self.gate_proj(y)) * self.up_proj(y))


def lora_layer():
    torch.manual_seed(0)
    layer = Projections().to("cuda", torch.bfloat16)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.02)
    return layer


def wrap(layer):
    from peft import LoraConfig, get_peft_model

    layer.requires_grad_(False)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(layer, config)


def build(variant: str):
    layer = lora_layer()
    if variant.startswith("torchao"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(layer, config=Float8LinearConfig.from_recipe_name("rowwise"))
        model = wrap(layer)
        if variant == "torchao-compiled":  # Inductor fuses LoRA's scale and add itself
            return torch.compile(model)
        fuse_lora(model)  # the adds fused as for the bf16 base, around torchao's base layer
        return model
    model = wrap(layer)
    fuse_lora(model)
    if variant.startswith("fp8"):
        quantize_frozen_base(model)
    return model


def run(model, x, y, grads):
    x.grad = y.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = model(x, y)
    torch.autograd.backward(outs, grads)
    return outs


def time_variant(model, x, y, grads, repeats: int) -> float:
    for _ in range(3):
        run(model, x, y, grads)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        run(model, x, y, grads)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1e3


def profile(model, x, y, grads) -> list[dict]:
    """The GPU kernels of one forward and backward, the longest first, with their share of the time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(model, x, y, grads)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:20]
    rows = [{"kernel": e.key[:100], "calls": e.count, "ms": round(e.self_device_time_total / 1e3, 3),
             "share": round(e.self_device_time_total / total, 3)} for e in top]
    for row in rows:
        print(f"    {row['ms']:7.3f} ms {row['share']:6.1%} x{row['calls']:<3} {row['kernel']}")
    return rows


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=12288)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variants", nargs="*", default=["bf16", "fp8", "fp8-precise", "fp8-fast-accum", "fp8-cublas-add", "fp8-inductor-quant", "fp8-eager-quant", "torchao", "torchao-compiled"])
    parser.add_argument("--profile", nargs="*", default=[], help="variants whose GPU kernels to list, by time")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fp8/layer.json"))
    args = parser.parse_args()

    torch.manual_seed(2)
    x = torch.randn(args.tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(args.tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = [torch.randn(args.tokens, HIDDEN, device="cuda", dtype=torch.bfloat16) * 1e-3 for _ in range(2)]
    flops = 2 * 2 * args.tokens * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV + 3 * HIDDEN * INTERMEDIATE)  # forward + input grads
    results = {"device": device_name(), "torch": torch.__version__, "tokens": args.tokens, "variants": {}}
    reference = None
    print(f"{'variant':18} {'ms':>7} {'vs bf16':>7} {'TFLOP/s':>8} {'out err':>8} {'dx err':>8}")
    for variant in args.variants:
        real_quantize, real_add = fp8_base.quantize_activation, fp8_base.add_low_rank_
        fast = fp8_base.FAST_ACCUMULATION_FORWARD, fp8_base.FAST_ACCUMULATION_INPUT_GRAD
        if variant in ("fp8-precise", "fp8-fast-accum"):
            fp8_base.FAST_ACCUMULATION_FORWARD = fp8_base.FAST_ACCUMULATION_INPUT_GRAD = variant == "fp8-fast-accum"
        if variant == "fp8-cublas-add":
            fp8_base.add_low_rank_ = lambda c, a, b: c.addmm_(a, b)
        if variant == "fp8-eager-quant":
            fp8_base.quantize_activation = fp8_base.quantize_rows
        elif variant == "fp8-inductor-quant":
            fp8_base.quantize_activation = torch.compile(fp8_base.quantize_rows, dynamic=True)
        try:
            model = build(variant)
            outs = run(model, x, y, grads)
            result = torch.cat([o.float().flatten() for o in outs]), torch.cat([x.grad.float().flatten(), y.grad.float().flatten()])
            ms = time_variant(model, x, y, grads, args.repeats)
            kernels = profile(model, x, y, grads) if variant in args.profile else None  # under the variant's settings
        except Exception as err:  # a variant that cannot run here (torchao missing or incompatible) is reported, not fatal
            results["variants"][variant] = {"status": f"{type(err).__name__}: {str(err)[:300]}"}
            print(f"{variant:18} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
            continue
        finally:
            fp8_base.quantize_activation, fp8_base.add_low_rank_ = real_quantize, real_add
            fp8_base.FAST_ACCUMULATION_FORWARD, fp8_base.FAST_ACCUMULATION_INPUT_GRAD = fast
        if reference is None:
            reference = (ms, result)
        errors = [((a - b).norm() / b.norm()).item() for a, b in zip(result, reference[1])]
        results["variants"][variant] = {"ms": round(ms, 3), "speedup_vs_first": round(reference[0] / ms, 3),
                                        "tflops": round(flops / ms / 1e9, 1), "output_rel_error": errors[0],
                                        "input_grad_rel_error": errors[1]}
        if kernels is not None:
            results["variants"][variant]["kernels"] = kernels
        print(f"{variant:18} {ms:7.2f} {reference[0] / ms:6.2f}x {flops / ms / 1e9:8.0f} {errors[0]:8.2e} {errors[1]:8.2e}", flush=True)
        del model
        torch.cuda.empty_cache()
    write_results(args.out, results)


if __name__ == "__main__":
    main()
