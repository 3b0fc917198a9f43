"""Document-causal attention on packed rows, one Mistral-7B layer's worth (32 query heads, 8 key/value
heads, head size 128), forward and backward, through each kernel that can run it, on one GPU.

    python bench/attention_kernels.py --model /tmp/smoke/mistral-7b --data /tmp/smoke/alpaca.jsonl \
        --out bench/results/attention-kernels.json

The micro-batches are the workload's own: its examples tokenized as training tokenizes them, packed
best-fit-decreasing into rows of 2,048 tokens as TRL packs them, 6 rows to a micro-batch as the recipe
takes them, so the document lengths (and so the work a block mask can skip) are the real ones. Three
micro-batches of different lengths are timed in turn, after each was seen in the warm-up: a kernel
compiled for one length pays nothing extra for the next only if it handles lengths dynamically.

  flex               the recipe's document_flex (alpaca_sft/kernels/attention.py): compiled flex_attention,
                     dynamic shapes, Inductor's default kernel configuration, 128-token mask blocks
  flex-autotune      the same compiled with mode="max-autotune-no-cudagraphs": Inductor times its
                     candidate block sizes, warps and stages for this shape and keeps the fastest
  flex-blocks-64     64-token mask blocks (less work wasted on blocks that straddle two short
                     documents) with kernel blocks to match
  flex-flash         flex_attention's BACKEND="FLASH": FlashAttention-4's CuTe DSL kernels under the
                     same block mask (needs flash-attn-4)
  flex-flash-static  the same compiled for each length it meets (dynamic=False), in case the FLASH
                     backend cannot take the dynamic lengths the recipe compiles for
  fa4-varlen         FlashAttention-4's varlen kernel (flash_attn.cute) given the documents' boundaries
                     directly: causal, nothing masked block by block
  fa4-varlen-window  the same with the (4095, 4095) window transformers' flash_attention_4 passes for
                     Mistral's sliding_window whenever a packed row is longer than 4,096 tokens
  sdpa-dense         SDPA with the dense per-example mask: what transformers' sdpa does with packed
                     position_ids (the correct fallback; memory grows with the square of the row)

Each variant's output and input gradients are checked against SDPA run one document at a time in
fp32; a variant that fails to build or run is reported with its error, not dropped.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from alpaca_sft.kernels.attention import document_mask
from harness import add_model_and_data, argument_parser, device_name, write_results

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 32
VARIANTS = ("flex", "flex-autotune", "flex-blocks-64", "flex-flash", "flex-flash-static", "fa4-varlen",
            "fa4-varlen-window", "sdpa-dense")


def packed_micro_batches(model: str, data: str, rows: int, count: int) -> list[list[int]]:
    """The document lengths of `count` micro-batches of `rows` packed rows, spread over the epoch."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    from alpaca_sft.data.dataset import build_dataset
    from alpaca_sft.models.tokenizer import load_tokenizer

    dataset, _ = build_dataset(data, load_tokenizer(model), max_length=2048)
    packed = pack_dataset(Dataset.from_dict({"input_ids": dataset["input_ids"]}), 2048, strategy="bfd")
    step = len(packed) // rows // count
    return [
        [length for row in packed[i * step * rows : i * step * rows + rows]["seq_lengths"] for length in row]
        for i in range(count)
    ]


def inputs(lengths: list[int], seed: int):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)

    def tensor(heads):
        return torch.randn(1, heads, total, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)

    q, k, v, grad = tensor(HEADS), tensor(KV_HEADS), tensor(KV_HEADS), tensor(HEADS)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    return q, k, v, grad, cu


def reference(q, k, v, grad, cu):
    """SDPA one document at a time, in fp32: the output and the gradients of q, k, v."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    outs = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                                   is_causal=True, enable_gqa=True))
    out = torch.cat(outs, dim=2)
    out.backward(grad.float())
    return out.detach(), q.grad, k.grad, v.grad


def block_mask(batch: dict, block_size: int = 128):
    """The document-causal block mask of a micro-batch, made once and shared, as training shares it
    between the 32 layers of one forward pass."""
    key = f"mask-{block_size}"
    if key not in batch:
        cu, total = batch["tensors"][4], int(batch["tensors"][4][-1])
        if block_size == 128:
            batch[key] = document_mask(cu, total, None, dense=False)
        else:
            document = torch.searchsorted(cu[1:], torch.arange(total, device=cu.device), right=True)
            batch[key] = create_block_mask(lambda b, h, q, kv: (document[q] == document[kv]) & (q >= kv),
                                           None, None, total, total, device=cu.device, BLOCK_SIZE=block_size)
    return batch[key]


def flex_variant(name: str):
    mode = "max-autotune-no-cudagraphs" if name == "flex-autotune" else None
    compiled = torch.compile(flex_attention, dynamic=name != "flex-flash-static", mode=mode)
    block_size, options = 128, None
    if name == "flex-blocks-64":
        block_size = 64
        options = {"BLOCK_M": 64, "BLOCK_N": 64, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                   "bwd_BLOCK_N2": 32}
    elif name in ("flex-flash", "flex-flash-static"):
        options = {"BACKEND": "FLASH"}
    elif name not in ("flex", "flex-autotune"):
        raise KeyError(name)
    return lambda q, k, v, batch: compiled(q, k, v, block_mask=block_mask(batch, block_size), enable_gqa=True,
                                           kernel_options=options)


def fa4_variant(window):
    from flash_attn.cute import flash_attn_varlen_func

    def run(q, k, v, batch):
        cu = batch["tensors"][4]
        # FA4 takes (tokens, heads, head_dim); the layer's tensors are (1, heads, tokens, head_dim)
        longest = int((cu[1:] - cu[:-1]).max())
        out = flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                     cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
                                     causal=True, window_size=window)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(0, 1)[None]

    return run


def sdpa_dense(q, k, v, batch):
    if "dense-mask" not in batch:
        batch["dense-mask"] = document_mask(batch["tensors"][4], q.shape[2], None, dense=True)
    mask = batch["dense-mask"]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def build(name: str):
    if name.startswith("flex"):
        return flex_variant(name)
    if name == "fa4-varlen":
        return fa4_variant((None, None))
    if name == "fa4-varlen-window":
        return fa4_variant((4095, 4095))
    return sdpa_dense


def forward_backward(attention, batch):
    q, k, v, grad, _ = batch["tensors"]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, batch)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def relative_error(result, expected) -> float:
    return max(float((r.float() - e).norm() / e.norm()) for r, e in zip(result, expected))


def measure(name: str, batches, repeats: int) -> dict:
    torch.cuda.synchronize()
    started = time.perf_counter()
    attention = build(name)
    for batch in batches:  # compile, autotune and warm up on every length that will be timed
        forward_backward(attention, batch)
    torch.cuda.synchronize()
    warm_up_s = time.perf_counter() - started
    errors = [relative_error(forward_backward(attention, b), b["reference"]) for b in batches]
    torch.cuda.reset_peak_memory_stats()
    forward_ms, total_ms = [], []
    for i in range(repeats):
        batch = batches[i % len(batches)]
        q, k, v, grad, _ = batch["tensors"]
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        marks[0].record()
        out = attention(q, k, v, batch)
        marks[1].record()
        out.backward(grad)
        marks[2].record()
        torch.cuda.synchronize()
        forward_ms.append(marks[0].elapsed_time(marks[1]))
        total_ms.append(marks[0].elapsed_time(marks[2]))
    tokens = sum(int(b["tensors"][4][-1]) for b in batches) / len(batches)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"forward_ms": round(median(forward_ms), 3), "forward_backward_ms": round(median(total_ms), 3),
            "per_micro_batch_ms": round(LAYERS * median(total_ms), 1), "tokens": int(tokens),
            "max_relative_error": float(f"{max(errors):.2e}"), "warm_up_s": round(warm_up_s, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main():
    parser = argument_parser(__doc__)
    add_model_and_data(parser)  # the model's tokenizer tokenizes the workload
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rows", type=int, default=6, help="packed rows per micro-batch (the recipe's 6)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    batches = []
    for seed, lengths in enumerate(packed_micro_batches(args.model, args.data, args.rows, count=3)):
        tensors = inputs(lengths, seed)
        batches.append({"tensors": tensors, "reference": reference(*tensors), "documents": len(lengths)})
    print(f"micro-batches: {[(int(b['tensors'][4][-1]), b['documents']) for b in batches]} (tokens, documents)")
    results = {"device": device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "command": "python bench/attention_kernels.py " + " ".join(sys.argv[1:]), "variants": {}}
    for name in args.variants:
        try:
            results["variants"][name] = measure(name, batches, args.repeats)
        except Exception as error:  # a kernel that cannot run this is a finding, not a crash
            traceback.print_exc(limit=-3)
            results["variants"][name] = {"error": f"{type(error).__name__}: {str(error).strip()[:300]}"}
        print(name, json.dumps(results["variants"][name]), flush=True)
    if args.out:
        write_results(args.out, results)


if __name__ == "__main__":
    main()
