"""Where whole training steps leave the GPU idle: the time between kernels, and what the host was doing then.

    python bench/step_gaps.py --model /tmp/smoke/mistral-7b --data /tmp/smoke/alpaca.jsonl \
        --config recipes/mistral-7b-lora.yaml --out bench/results/step-gaps.json

bench/step_breakdown.py times forward + backward of micro-batches; a run's tokens/s also pays for what lies
between them: the loader and collator, the optimizer step, gradient clipping, logging, and every point where
the host waits on the GPU (a `.item()`) and then makes it wait while it queues the next kernels. Here the
trainer train_sft.py builds trains for real (Trainer.train, the recipe's loop, no evaluation), and a profiler
records optimizer steps --first to --last. The GPU's busy time is the union of its kernels and copies; every
idle stretch of at least --gap_ms is charged to the host-side work that overlaps it most (a profiler
annotation such as the optimizer's step or the loader's next batch, else the outermost operator, else the CUDA
runtime call), and the table sums them.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

import torch
from transformers import TrainerCallback

from harness import add_model_and_data, argument_parser, device_name, write_results
from step_breakdown import recipe_trainer  # bench/step_breakdown.py, beside this script

GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


class ProfileSteps(TrainerCallback):
    """A profiler over optimizer steps first..last (1-based, as the trainer counts them)."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.profiler, self.seconds = first, last, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.first:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
            self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.last and self.profiler is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.started
            self.profiler.stop()


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def host_work(events: list[dict], start: float, end: float) -> str:
    """The host-side event that overlaps [start, end] the most, annotations first."""
    def overlap(e):
        return max(0.0, min(end, e["ts"] + e["dur"]) - max(start, e["ts"]))

    for kinds in (("user_annotation",), ("cpu_op",), ("cuda_runtime", "cuda_driver")):
        candidates = [e for e in events if e.get("cat") in kinds and overlap(e) > 0]
        if kinds == ("cpu_op",):  # the outermost operator: the longest one overlapping
            candidates = sorted(candidates, key=lambda e: -e["dur"])[:1]
        if candidates:
            return max(candidates, key=overlap)["name"][:90]
    return "(no host event: the host was in Python between operators)"


def gaps(trace: dict, min_gap_ms: float) -> dict:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    gpu = merged([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_WORK])
    if not gpu:
        return {"gpu_busy_ms": 0.0}
    host = [e for e in events if e.get("cat") not in (*GPU_WORK, "Trace")]  # "Trace": the profiler's own span
    span = (gpu[-1][1] - gpu[0][0]) / 1e3
    busy = sum(end - start for start, end in gpu) / 1e3
    by_cause, count, longest = defaultdict(float), defaultdict(int), []
    for (_, idle_from), (idle_to, _) in itertools.pairwise(gpu):
        if (idle_to - idle_from) / 1e3 >= min_gap_ms:
            cause = host_work(host, idle_from, idle_to)
            by_cause[cause] += (idle_to - idle_from) / 1e3
            count[cause] += 1
            longest.append((idle_to - idle_from, idle_from, idle_to))
    idle_large = sum(by_cause.values())
    # The five longest gaps in full: every host event overlapping each, longest overlap first.
    detail = []
    for length, idle_from, idle_to in sorted(longest, reverse=True)[:5]:
        beside = sorted(((min(idle_to, e["ts"] + e["dur"]) - max(idle_from, e["ts"])) / 1e3, e.get("cat"), e["name"][:80])
                        for e in host if e["ts"] < idle_to and e["ts"] + e["dur"] > idle_from)
        detail.append({"ms": length / 1e3, "host_events": [{"overlap_ms": round(o, 3), "cat": c, "name": n}
                                                             for o, c, n in sorted(beside, reverse=True)[:12]]})
    return {"gpu_span_ms": span, "gpu_busy_ms": busy, "gpu_idle_ms": span - busy,
            f"idle_in_gaps_of_{min_gap_ms}_ms_or_more": idle_large,
            "gaps_by_host_work": [{"host_work": k, "ms": v, "gaps": count[k]}
                                  for k, v in sorted(by_cause.items(), key=lambda kv: -kv[1])][:20],
            "longest_gaps": detail}


def main():
    parser = argument_parser(__doc__)
    add_model_and_data(parser)
    parser.add_argument("--config", default="recipes/mistral-7b-lora.yaml")
    parser.add_argument("--rows", type=int, default=3000, help="records to tokenize and pack")
    parser.add_argument("--first", type=int, default=4, help="first optimizer step profiled (earlier ones warm up)")
    parser.add_argument("--last", type=int, default=5)
    parser.add_argument("--gap_ms", type=float, default=0.1, help="idle stretches shorter than this are not charged")
    parser.add_argument("--out", type=Path, default=Path("bench/results/step-gaps.json"))
    parser.add_argument("flags", nargs="*", help="more train_sft.py flags, after --")
    args = parser.parse_args()

    args.work = Path(tempfile.mkdtemp(prefix="step_gaps-"))
    trainer = recipe_trainer(args, "--max_steps", str(args.last), "--save_strategy", "no", "--logging_steps", "1",
                             *args.flags)
    profile = ProfileSteps(args.first, args.last)
    trainer.add_callback(profile)
    trainer.train()

    trace_path = args.work / "trace.json"
    profile.profiler.export_chrome_trace(str(trace_path))
    steps = args.last - args.first + 1
    micro_batches = steps * trainer.args.gradient_accumulation_steps
    result = {"device": device_name(),
              "config": args.config, "flags": args.flags, "optimizer_steps": steps, "micro_batches": micro_batches,
              "wall_ms": profile.seconds * 1e3, **gaps(json.loads(trace_path.read_text()), args.gap_ms)}
    write_results(args.out, result)
    print(f"{steps} optimizer steps, {micro_batches} micro-batches: wall {result['wall_ms']:.0f} ms, GPU busy "
          f"{result['gpu_busy_ms']:.0f} ms ({result['gpu_busy_ms'] / result['wall_ms']:.1%}); per micro-batch "
          f"{result['wall_ms'] / micro_batches:.1f} ms wall, {result['gpu_busy_ms'] / micro_batches:.1f} ms GPU")
    for row in result.get("gaps_by_host_work", []):
        print(f"  {row['ms']:8.1f} ms idle in {row['gaps']:4d} gaps while the host ran {row['host_work']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
