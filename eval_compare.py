"""Compare a base model with tuned versions of it on the same prompts, greedy; merge and push.

    python eval_compare.py --base mistralai/Mistral-7B-v0.1 --tuned runs/mistral-7b-lora
    python eval_compare.py --base mistralai/Mistral-7B-v0.1 --tuned runs/mistral-7b-lora --push_to_hub me/mistral-7b-alpaca
    python eval_compare.py --base mistralai/Mistral-7B-v0.1 --tuned runs/bf16 runs/fp8 --output_dir runs/bf16-vs-fp8

--tuned is the output_dir of train_sft.py (a LoRA adapter trained on a bf16, FP8 or 4-bit base, merged
here into a full-precision load of the base) or an already merged model; several are compared in one
run, the base generated once, a column per model. Writes comparison.md, comparison.json and the merged
models to --output_dir (default with one --tuned: <tuned>-comparison, beside the folder evaluated, never
inside it; merged/ holds the merged model, or merged/<name>/ each of several) and prints the models side
by side.
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

from alpaca_sft.quiet import quiet_libraries

quiet_libraries()  # before the libraries load

from alpaca_sft.eval.comparison_dir import ComparisonDir, ComparisonDirError, Interrupted, unfinished_merge
from alpaca_sft.eval.prompts import ContextError, PromptFileError, check_lengths, read_prompt_files
from alpaca_sft.eval.report import model_names, report_texts, side_by_side, tables
from alpaca_sft.eval.scoring import paired_tests, score
from alpaca_sft.models.generation import BATCHINGS, auto_batching, generate
from alpaca_sft.models.loading import load_for_inference, this_process_device
from alpaca_sft.models.tokenizer import TokenizerError, load_tokenizer
from alpaca_sft.release.card import model_card
from alpaca_sft.release.gguf_export import K_QUANTS, TYPES, ExportError, export_for_release, push_files, release_name
from alpaca_sft.release.merge import logits_on, merge, quantized_gap, save_merged
from alpaca_sft.release.pairing import PairError, inspect_pair
from alpaca_sft.release.push import PushError, check_can_push, push

DTYPES = ("bfloat16", "float16", "float32")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base model: Hub id or local folder")
    parser.add_argument("--tuned", required=True, nargs="+",
                        help="one or more adapter folders (train_sft.py output_dir) or merged model folders")
    parser.add_argument("--prompts", nargs="+", default=["data/eval_prompts.jsonl"],
                        help="JSONL files: instruction/input, question/context/answer or prompt, optional reference and schema")
    parser.add_argument("--output_dir", default=None, help="default with one --tuned: <tuned>-comparison; needed with several")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=512,
                        help="prompts generated at once, in batches of similar length; one that runs out of GPU memory "
                             "is split (bench/RESULTS.md: prompts per second by batch size)")
    parser.add_argument("--batching", choices=("auto", *BATCHINGS), default="auto",
                        help="how prompts share the GPU (alpaca_sft/models/generation.py): static batches; refill; "
                             "compiled (static batches, the decoding step compiled with CUDA graphs on a GPU: tens of "
                             "seconds once, then several times faster); auto: compiled on a GPU where the run has "
                             "enough decoding steps (batches x max_new_tokens) to repay the compile, static otherwise")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--allow_other_base", action="store_true", help="merge an adapter into a base it was not trained on")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the merged model, tokenizer and card (one --tuned)")
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: create the repo private")
    parser.add_argument("--gguf", nargs="+", choices=TYPES, metavar="TYPE", help="also write the merged model as GGUF "
                        "files beside merged/, each with an Ollama Modelfile (pushed too): bf16, f16, q8_0; K-quants "
                        "(q4_k_m, q5_k_m, q6_k) with --llama_quantize")
    parser.add_argument("--llama_quantize", metavar="PATH", help="llama.cpp's llama-quantize binary, for --gguf K-quants")
    args = parser.parse_args(argv)
    args.command = "python eval_compare.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if set(args.gguf or ()) & set(K_QUANTS) and not args.llama_quantize:
        parser.error("--gguf K-quants are written by llama.cpp's llama-quantize: give its path with --llama_quantize")
    if args.max_new_tokens <= 0 or args.batch_size <= 0:
        parser.error("--max_new_tokens and --batch_size must be positive")
    resolved = [Path(t).resolve() for t in args.tuned]
    if len(set(resolved)) < len(resolved):
        parser.error("--tuned names one folder more than once")
    if len(args.tuned) > 1 and args.output_dir is None:
        parser.error("with several --tuned, give --output_dir: the folder their comparison and merged models go to")
    if len(args.tuned) > 1 and args.gguf:
        parser.error("--gguf exports one merged model: give one --tuned (or export each merged model with "
                     "python tools/export_gguf.py <output_dir>/merged/<name> OUT.gguf)")
    if len(args.tuned) > 1 and args.push_to_hub:
        parser.error("--push_to_hub uploads one merged model: give one --tuned (each merged model can be uploaded "
                     "later with hf upload REPO_ID <output_dir>/merged/<name>)")
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as err:
            parser.error(f"--push_to_hub {args.push_to_hub}: not a Hub repository id (owner/name): {err}")
    return args


def tuned_runs(args) -> dict:
    """Each --tuned folder by its column name, checked against --base before anything large loads."""
    runs = {}
    for name, path in zip(model_names(args.tuned), args.tuned):
        if Path(path).is_dir() and (problem := unfinished_merge(Path(path))):
            raise PairError(problem)
        runs[name] = inspect_pair(args.base, path, args.allow_other_base)
    return runs


def check_output_dir(output_dir: Path, base: str, runs: dict) -> None:
    """The comparison's folder is none of the models' and holds none of them: publishing replaces its merged/."""
    out = output_dir.resolve()
    for flag, given in [("--base", Path(base))] + [("--tuned", run.path) for run in runs.values()]:
        if not given.exists():
            continue  # a Hub id
        inside = given.resolve() == out or given.resolve() in out.parents
        if inside or out in given.resolve().parents:
            raise ComparisonDirError(f"--output_dir {output_dir} {'is inside' if inside else 'holds'} {flag} {given}: "
                                     "give an --output_dir apart from the models compared")


def context_of(name_or_path: str) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def merge_run(args, name: str, run, base_model, tokenizer, probes: list[str], staged: Path, final: Path, dtype: str):
    """The adapter merged into base_model and saved to `staged`; returns the model and what models[name] records."""
    started = time.perf_counter()
    model, gap = merge(base_model, run.path, tokenizer, probes)
    save_merged(model, tokenizer, staged)
    record = {"path": str(run.path), "merged_to": str(final), "merge_max_abs_logit_diff": gap,
              "merge_and_save_seconds": round(time.perf_counter() - started, 1)}
    print(f"{name}: merged into a {dtype} base: max |logit(base+adapter) - logit(merged)| = {gap:.2e}; saved to {final}")
    if run.trained_in_4bit or run.trained_in_fp8:
        key, trained = ("qlora_gap", "QLoRA: 4-bit") if run.trained_in_4bit else ("fp8_gap", "FP8")
        record[key] = quantized_gap(args.base, run.path, run.record.precision, tokenizer, probes,
                                    logits_on(model, tokenizer, probes))
        print(f"{name}: {trained} base + adapter vs merged {dtype} model: {record[key]}")
    return model, record


def generate_all(args, prompts, runs: dict, tokenizers: dict, folder: ComparisonDir, device: str, dtype: str):
    """The base's answers, then each tuned model's: an adapter merged into a load of the base (the one that
    generated, for the first) and staged in the folder, a merged model loaded as it is. Returns the answers,
    what models[name] records, and where each merged model is staged."""
    texts, first = [p.prompt for p in prompts], next(iter(runs))
    print(f"base model {args.base}: generating for {len(prompts)} prompts")
    model = load_for_inference(args.base, dtype, device)
    generations = {"base": generate(model, tokenizers[first], texts, args.max_new_tokens, args.batch_size,
                                    args.batching)}
    models, staged = {"base": {"path": args.base}}, {}
    for name, run in runs.items():
        if run.is_adapter:
            staged[name], final = folder.stage_model(name if len(runs) > 1 else None)
            base_model = model if model is not None else load_for_inference(args.base, dtype, device)
            model, models[name] = merge_run(args, name, run, base_model, tokenizers[name], texts[:4], staged[name],
                                            final, dtype)
        else:
            model = None  # the base, freed before another model loads
            model, models[name] = load_for_inference(str(run.path), dtype, device), {"path": str(run.path)}
        print(f"{name}: generating for {len(prompts)} prompts")
        generations[name] = generate(model, tokenizers[name], texts, args.max_new_tokens, args.batch_size, args.batching)
        model = None
    return generations, models, staged


def card_of(args, name: str, run, model: dict, scores: dict, tokenizer):
    """The model card of one tuned model: its recipe, and its numbers beside the base's."""
    return model_card(args.base, run.record, {"base": scores["base"], "tuned": scores[name]}, " ".join(args.prompts),
                      args.push_to_hub or Path(model.get("merged_to", run.path)).name, tokenizer.eos_token)


def release_folder(runs: dict, models: dict) -> Path:
    """The one --tuned run's model folder as released: its merged folder, or the merged model it was given as."""
    ((name, run),) = runs.items()
    return Path(models[name].get("merged_to", run.path))


def main(args) -> dict:
    # Everything that can be wrong with the inputs is found before any large weights load.
    prompts = read_prompt_files(args.prompts)
    runs = tuned_runs(args)
    if args.push_to_hub:
        check_can_push(args.push_to_hub)
    output_dir = Path(args.output_dir or f"{str(next(iter(runs.values())).path).rstrip('/')}-comparison")
    check_output_dir(output_dir, args.base, runs)
    device = this_process_device()
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    if args.batching == "auto":
        args.batching, why = auto_batching(len(prompts), args.batch_size, args.max_new_tokens, device)
        print(f"batching {why} (--batching auto)")
    tokenizers = {name: load_tokenizer(str(run.path) if (run.path / "tokenizer_config.json").is_file() else args.base)
                  for name, run in runs.items()}
    if warning := check_lengths(prompts, next(iter(tokenizers.values())), context_of(args.base), args.max_new_tokens):
        print(warning)
    meta = {"base": args.base, "tuned": [str(run.path) for run in runs.values()], "prompts": " ".join(args.prompts),
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "batching": args.batching, "dtype": dtype,
            "device": device}

    with ComparisonDir(output_dir, args.command) as folder:
        if folder.removed:
            print(f"{output_dir}: removed what a stopped run left: {', '.join(folder.removed)}")
        generations, models, staged = generate_all(args, prompts, runs, tokenizers, folder, device, dtype)
        scored = {name: score(prompts, gens) for name, gens in generations.items()}
        scores = {name: summary for name, (summary, _) in scored.items()}
        judgments = {name: judged for name, (_, judged) in scored.items()}
        tests = paired_tests(prompts, generations, judgments)
        print(side_by_side(prompts, generations, judgments) + "\n\n" + tables(scores, tests))
        cards = {name: card_of(args, name, run, models[name], scores, tokenizers[name]) for name, run in runs.items()}
        for name, merged in staged.items():  # each merged folder is ours: complete, card included, pushed or not
            cards[name].save(merged / "README.md")
            folder.seal(merged, {"merged_by": "eval_compare.py",
                                 "merge_max_abs_logit_diff": models[name]["merge_max_abs_logit_diff"]})
        folder.publish(report_texts(prompts, generations, judgments, scores, tests, models, meta))
        ggufs = export_for_release(release_folder(runs, models), output_dir, args.gguf, release_name(
            args.base, args.push_to_hub), args.llama_quantize) if args.gguf else []
    print(f"\nwrote {output_dir / 'comparison.md'} and {output_dir / 'comparison.json'}")

    if args.push_to_hub:
        merged_dir = release_folder(runs, models)
        try:
            print(f"pushed: {push(merged_dir, args.push_to_hub, args.private, cards[next(iter(runs))])}")
            push_files(ggufs, args.push_to_hub)
        except KeyboardInterrupt:
            private = " --private" if args.private else ""
            raise Interrupted(f"interrupted during the push: the comparison and {merged_dir} are complete; upload "
                              f"it with:\n  hf upload {args.push_to_hub} {merged_dir} .{private}") from None
    return scores


def cli(argv: list[str] | None = None) -> int:
    """The command line: 0, or 1 with the problem said in one message (130 after Ctrl-C)."""
    try:
        main(parse_args(argv))
    except Interrupted as err:
        print(f"\n{err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted before anything was written; run the command again", file=sys.stderr)
        return 130
    except (PromptFileError, ContextError, PairError, PushError, TokenizerError, ComparisonDirError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
