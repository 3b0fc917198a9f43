"""Greedy generation speed: the same prompts through each way of batching, in one process, model by model.

    python bench/generation_speed.py --base build/gemma-3-270m --tuned runs/gemma-3-270m-alpaca-sql --out gen.json
    python tools/random_model.py /tmp/mistral-7b --size 7b
    python bench/generation_speed.py --base /tmp/mistral-7b --limit 256 --runs static:128 refill:128 --out gen-7b.json
    python bench/generation_speed.py --base build/gemma-3-270m --runs static:512 compiled:512 --out gen-compiled.json

A run is BATCHING:BATCH_SIZE, BATCHING one of models/generation.py's ("static": batches of similar length, each
until its longest answer ends, the way before; "refill": rows leave when done and waiting prompts take their place;
"compiled": static batches on a static cache, the decoding step compiled by transformers, CUDA graphs on a GPU),
"static-grouped" (static batches whose decoding steps read each key/value head once, kernels/grouped_decode.py, as
refill's do: the two levers apart) or "continuous" (transformers' own continuous batching, model.generate_batch, at
most BATCH_SIZE requests a step: the other candidate, models/generation.py's docstring says why it is not the
default; without flash attention it may be slow, so try it on the tuned model first: --models tuned). The first run is the reference the others
are compared with. Models: the base, then --tuned (an adapter folder, merged into the base with peft's
merge_and_unload, or a merged model), bfloat16 on a GPU and float32 on a CPU. On the held-out prompts, 512 new
tokens by default; --limit takes that many prompts spread evenly over the files (the random-weight 7B shape, where
no answer ever stops, is slow).

For each model and run: prompts per second (prompts / the run's generation wall time), new tokens per second, peak
GPU memory, answers identical to the reference run's, the share that stopped by EOS, mean new tokens, and the
forward passes and rows they computed. Prints a table at the end; writes everything to --out as JSON.
A compiled run's rates are steady ones: the same prompts run through it once before, its first batch compiling the
decoding step; that first run's seconds (compile included) are its "first_run" (the table's "1st run s"), and
1st run s - seconds is about what compiling cost.
A rehearsal on the CPU: --base build/tiny-mistral --tuned <a tiny adapter> --limit 8 --max_new_tokens 16.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

import torch
import transformers

from alpaca_sft.eval.prompts import read_prompt_files
from alpaca_sft.kernels.grouped_decode import grouped_decoding
from alpaca_sft.models.generation import BATCHINGS, Generation, generate
from alpaca_sft.models.loading import load_for_inference, this_process_device
from alpaca_sft.models.tokenizer import load_tokenizer
from harness import argument_parser, device_name, write_results

HELD_OUT = ["data/heldout_alpaca.jsonl", "data/heldout_sql.jsonl", "data/eval_prompts.jsonl"]
RUN_BATCHINGS = (*BATCHINGS, "static-grouped", "continuous")


def run_spec(text: str) -> tuple[str, int]:
    batching, _, size = text.partition(":")
    if batching not in RUN_BATCHINGS or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCHING:BATCH_SIZE, BATCHING one of {RUN_BATCHINGS}")
    return batching, int(size)


def spread(prompts: list, limit: int | None) -> list:
    """`limit` prompts at even steps through the list, so that every file keeps its share."""
    if not limit or limit >= len(prompts):
        return prompts
    return [prompts[i * len(prompts) // limit] for i in range(limit)]


def continuous(model, tokenizer, prompts: list[str], max_new_tokens: int, requests: int) -> list[Generation]:
    """transformers' continuous batching, greedy, its answers as generate() gives them."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    eos = tokenizer.eos_token_id
    inputs = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    sizes = {"max_requests_per_batch": requests}
    if not torch.cuda.is_available():  # sized from the GPU's free memory otherwise; a CPU rehearsal needs a small cache
        sizes.update(num_blocks=requests * (2 + (max(map(len, inputs)) + max_new_tokens) // 256), max_batch_tokens=512)
    outputs = model.generate_batch(inputs, GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                                            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id),
                                   ContinuousBatchingConfig(**sizes), max_new_tokens=max_new_tokens)
    answers = []
    for output in outputs.values():  # in the order of the inputs
        if output.error is not None:
            raise RuntimeError(f"generate_batch failed a request: {output.error}")
        tokens = output.generated_tokens[:max_new_tokens]
        stopped = eos in tokens
        kept = tokens[: tokens.index(eos)] if stopped else tokens
        answers.append(Generation(tokenizer.decode(kept, skip_special_tokens=True), "eos" if stopped else "length",
                                  len(kept) + stopped, 0.0))
    if len(answers) != len(prompts):
        raise RuntimeError(f"generate_batch answered {len(answers)} of {len(prompts)} prompts")
    return answers


def timed_run(model, tokenizer, prompts: list[str], max_new_tokens: int, batching: str, batch_size: int) -> dict:
    """One run: its answers, wall time, peak memory and the forward passes it took."""
    rows = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    cuda = torch.cuda.is_available()
    if cuda:  # every run starts from the same free memory (generate_batch sizes its cache from it)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    grouped = batching == "static-grouped"
    began = time.perf_counter()
    try:
        if batching == "continuous":
            answers = continuous(model, tokenizer, prompts, max_new_tokens, batch_size)
        else:
            with grouped_decoding(model) if grouped else nullcontext():
                answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size,
                                   batching="static" if grouped else batching)
        if cuda:
            torch.cuda.synchronize()
    finally:
        hook.remove()
    seconds = time.perf_counter() - began
    new_tokens = sum(a.new_tokens for a in answers)
    return {"batching": batching, "batch_size": batch_size, "seconds": seconds,
            "prompts_per_second": len(prompts) / seconds, "new_tokens_per_second": new_tokens / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "stopped_by_eos": sum(a.stop == "eos" for a in answers) / len(answers),
            "mean_new_tokens": new_tokens / len(answers), "forward_passes": len(rows), "rows_computed": sum(rows),
            "texts": [a.text for a in answers]}


def measure(name: str, model, tokenizer, prompts: list[str], args) -> dict:
    """Every run on one model, after a short warm-up of each (CUDA context, kernels, the first allocations). A compiled
    run is warmed up by a whole run instead: a short one would compile shapes (batch, cache length) the run never
    meets, and its run would compile again."""
    for batching, batch_size in args.runs:
        if batching != "compiled":
            timed_run(model, tokenizer, prompts[:4], 4, batching, batch_size)
    runs, reference = {}, None
    for batching, batch_size in args.runs:
        first = (timed_run(model, tokenizer, prompts, args.max_new_tokens, batching, batch_size)
                 if batching == "compiled" else None)
        result = timed_run(model, tokenizer, prompts, args.max_new_tokens, batching, batch_size)
        if first:
            result["first_run"] = {"seconds": first["seconds"], "prompts_per_second": first["prompts_per_second"],
                                   "identical_to_this_run": sum(a == b for a, b in zip(first.pop("texts"),
                                                                                         result["texts"])) / len(prompts)}
        texts = result.pop("texts")
        reference = reference or (f"{batching}:{batch_size}", texts, result["seconds"])
        result["identical_to_reference"] = sum(a == b for a, b in zip(texts, reference[1])) / len(texts)
        result["speedup"] = reference[2] / result["seconds"]
        runs[f"{batching}:{batch_size}"] = result
        print(f"{name} {batching}:{batch_size}: " + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
            if k not in ("batching", "batch_size")), flush=True)
    return {"reference": reference[0], "runs": runs}


def load_tuned(args, dtype: str, device: str):
    """The tuned model: an adapter merged into the base (peft's merge_and_unload), or a merged folder as it is."""
    if not (Path(args.tuned) / "adapter_config.json").is_file():
        return load_for_inference(args.tuned, dtype, device)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_for_inference(args.base, dtype, device), args.tuned).merge_and_unload().eval()


def table(results: dict) -> str:
    lines = ["| model | run | prompts/s | new tokens/s | speed-up | peak GiB | identical | EOS | mean new | forwards | "
             "1st run s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, measured in results["models"].items():
        for run, r in measured["runs"].items():
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            first = f"{r['first_run']['seconds']:.1f}" if "first_run" in r else "-"
            lines.append(f"| {name} | {run} | {r['prompts_per_second']:.2f} | {r['new_tokens_per_second']:,.0f} | "
                         f"{r['speedup']:.2f}x | {peak} | {r['identical_to_reference']:.1%} | "
                         f"{r['stopped_by_eos']:.1%} | {r['mean_new_tokens']:.1f} | {r['forward_passes']} | {first} |")
    return "\n".join(lines)


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--base", required=True, help="model folder (or Hub id)")
    parser.add_argument("--tuned", help="adapter folder (train_sft.py output_dir) or merged model folder")
    parser.add_argument("--prompts", nargs="+", default=HELD_OUT)
    parser.add_argument("--limit", type=int, help="this many prompts, spread evenly over the files")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--runs", nargs="+", type=run_spec, default=[("static", 128), ("refill", 128), ("refill", 512)],
                        help="BATCHING:BATCH_SIZE ... (the first is the reference)")
    parser.add_argument("--models", nargs="+", choices=("base", "tuned"), default=["base", "tuned"],
                        help="which of them to measure (tuned only where --tuned is given)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    prompts = spread([p.prompt for p in read_prompt_files(args.prompts)], args.limit)
    device = this_process_device()
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    has_tokenizer = args.tuned and (Path(args.tuned) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(args.tuned if has_tokenizer else args.base)
    results = {"device": device_name(),
               "torch": torch.__version__, "transformers": transformers.__version__, "dtype": dtype,
               "prompts": len(prompts), "prompt_files": args.prompts, "max_new_tokens": args.max_new_tokens,
               "models": {}}
    models = [("base", lambda: load_for_inference(args.base, dtype, device))]
    if args.tuned:
        models.append(("tuned", lambda: load_tuned(args, dtype, device)))
    for name, load in [(name, load) for name, load in models if name in args.models]:
        model = load()
        results["models"][name] = measure(name, model, tokenizer, prompts, args)
        del model
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    write_results(args.out, results)
    print(f"\n{len(prompts)} prompts, {args.max_new_tokens} new tokens at most, {dtype} on {results['device']} "
          f"(transformers {transformers.__version__})\n" + table(results) + f"\n\nwrote {args.out}")


if __name__ == "__main__":
    main()
