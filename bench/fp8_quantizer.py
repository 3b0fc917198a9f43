"""The row quantizer alone (alpaca_sft/kernels/fp8_base.py): GB/s at the widths a Mistral-7B layer feeds
it (inputs and output gradients of 1,024, 4,096 and 14,336 columns), for several row counts per program,
beside Inductor's kernel for the same function. One GPU.

    python bench/fp8_quantizer.py --tokens 12288 --out bench/results/fp8/quantizer.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

import torch

from alpaca_sft.kernels.fp8_base import quantize_rows, row_quantizer
from harness import argument_parser, device_name, write_results


def gbps(fn, x, repeats=50) -> float:
    for _ in range(3):
        fn(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    return x.numel() * 3 / seconds / 1e9  # bf16 read + e4m3 written


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=12288)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fp8/quantizer.json"))
    args = parser.parse_args()
    quantize, inductor = row_quantizer(), torch.compile(quantize_rows, dynamic=True)
    results = {"device": device_name(), "tokens": args.tokens, "GB/s": {}}
    for columns in (1024, 4096, 14336):
        x = torch.randn(args.tokens, columns, device="cuda", dtype=torch.bfloat16)
        row = {"inductor": gbps(inductor, x)}
        for elements in (1024, 4096, 8192, 16384, 32768):
            row[f"{elements} elements/program"] = gbps(lambda t: quantize(t, elements_per_program=elements), x)
        results["GB/s"][columns] = row
        print(columns, "  ".join(f"{k}: {v:,.0f}" for k, v in row.items()), flush=True)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
