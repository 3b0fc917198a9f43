"""Compare a base model with its tuned version on the same prompts, greedy; merge and push.

    python eval_compare.py --base mistralai/Mistral-7B-v0.1 --tuned runs/mistral-7b-lora
    python eval_compare.py --base mistralai/Mistral-7B-v0.1 --tuned runs/mistral-7b-lora --push_to_hub me/mistral-7b-alpaca

--tuned is the output_dir of train_sft.py (a LoRA adapter trained on a bf16, FP8 or 4-bit base, merged
here into a full-precision load of the base) or an already merged model. Writes comparison.md,
comparison.json and the merged model to --output_dir (default: <tuned>-comparison, beside the
folder evaluated, never inside it) and prints both models side by side.
"""

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

# Library noise a user cannot act on, silenced before the libraries load: bitsandbytes says on every import
# without a GPU that an optional kernels package is missing; transformers 5.24 deprecates is_gradient_checkpointing,
# which PEFT still calls.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing", category=FutureWarning)


from alpaca_sft.eval.prompts import PromptFileError, read_prompt_files
from alpaca_sft.eval.report import side_by_side, summary_table, write_report
from alpaca_sft.eval.scoring import score
from alpaca_sft.models.generation import generate
from alpaca_sft.models.loading import load_model, this_process_device
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
    parser.add_argument("--tuned", required=True, help="adapter folder (train_sft.py output_dir) or merged model folder")
    parser.add_argument("--prompts", nargs="+", default=["data/eval_prompts.jsonl"],
                        help="JSONL files: instruction/input, question/context/answer or prompt, optional reference and schema")
    parser.add_argument("--output_dir", default=None, help="default: <tuned>-comparison")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=128,
                        help="prompts generated at once, in batches of similar length (bench/RESULTS.md: prompts per second)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--allow_other_base", action="store_true", help="merge an adapter into a base it was not trained on")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the merged model, tokenizer and card")
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: create the repo private")
    parser.add_argument("--gguf", nargs="+", choices=TYPES, metavar="TYPE", help="also write the merged model as GGUF "
                        "files beside merged/, each with an Ollama Modelfile (pushed too): bf16, f16, q8_0; K-quants "
                        "(q4_k_m, q5_k_m, q6_k) with --llama_quantize")
    parser.add_argument("--llama_quantize", metavar="PATH", help="llama.cpp's llama-quantize binary, for --gguf K-quants")
    args = parser.parse_args(argv)
    if set(args.gguf or ()) & set(K_QUANTS) and not args.llama_quantize:
        parser.error("--gguf K-quants are written by llama.cpp's llama-quantize: give its path with --llama_quantize")
    if args.max_new_tokens <= 0 or args.batch_size <= 0:
        parser.error("--max_new_tokens and --batch_size must be positive")
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as err:
            parser.error(f"--push_to_hub {args.push_to_hub}: not a Hub repository id (owner/name): {err}")
    return args


def main(args) -> dict:
    # Everything that can be wrong with the inputs is found before any large weights load.
    prompts = read_prompt_files(args.prompts)
    tuned = inspect_pair(args.base, args.tuned, args.allow_other_base)
    if args.push_to_hub:
        check_can_push(args.push_to_hub)
    output_dir = Path(args.output_dir or f"{str(tuned.path).rstrip('/')}-comparison")
    device = this_process_device()
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    has_tokenizer = (tuned.path / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(tuned.path) if has_tokenizer else args.base)
    texts = [p.prompt for p in prompts]
    meta = {"base": args.base, "tuned": str(tuned.path), "prompts": " ".join(args.prompts),
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "dtype": dtype, "device": device}

    print(f"base model {args.base}: generating for {len(prompts)} prompts")
    model = load_model(args.base, dtype, device=device).eval()
    generations = {"base": generate(model, tokenizer, texts, args.max_new_tokens, args.batch_size)}

    merged_dir = tuned.path
    if tuned.is_adapter:
        probes = texts[:4]
        started = time.perf_counter()
        model, gap = merge(model, tuned.path, tokenizer, probes)
        merged_dir = save_merged(model, tokenizer, output_dir / "merged")
        meta.update(merge_max_abs_logit_diff=gap, merged_to=str(merged_dir),
                    merge_and_save_seconds=round(time.perf_counter() - started, 1))
        print(f"merged into a {dtype} base: max |logit(base+adapter) - logit(merged)| = {gap:.2e}; saved to {merged_dir}")
        if tuned.trained_in_4bit or tuned.trained_in_fp8:
            key, trained = ("qlora_gap", "QLoRA: 4-bit") if tuned.trained_in_4bit else ("fp8_gap", "FP8")
            merged_logits = logits_on(model, tokenizer, probes)
            meta[key] = quantized_gap(args.base, tuned.path, tuned.record.config, tokenizer, probes, merged_logits)
            print(f"{trained} base + adapter vs merged {dtype} model: {meta[key]}")
    else:
        model = load_model(str(tuned.path), dtype, device=device).eval()
    generations["tuned"] = generate(model, tokenizer, texts, args.max_new_tokens, args.batch_size)

    scored = {name: score(prompts, gens) for name, gens in generations.items()}
    scores = {name: summary for name, (summary, _) in scored.items()}
    judgments = {name: judged for name, (_, judged) in scored.items()}
    print(side_by_side(prompts, generations, judgments) + "\n\n" + summary_table(scores))
    write_report(output_dir, prompts, generations, judgments, scores, meta)
    print(f"\nwrote {output_dir / 'comparison.md'} and {output_dir / 'comparison.json'}")

    card = model_card(args.base, tuned.record, scores, " ".join(args.prompts), args.push_to_hub or merged_dir.name,
                      tokenizer.eos_token)
    if tuned.is_adapter:  # the merged folder is ours: complete, card included, whether pushed now or later
        card.save(merged_dir / "README.md")
    ggufs = export_for_release(merged_dir, output_dir, args.gguf, release_name(args.base, args.push_to_hub),
                               args.llama_quantize) if args.gguf else []
    if args.push_to_hub:
        print(f"pushed: {push(merged_dir, args.push_to_hub, args.private, card)}")
        push_files(ggufs, args.push_to_hub)
    return scores


def cli(argv: list[str] | None = None) -> int:
    """The command line: 0, or 1 with the problem said in one message."""
    try:
        main(parse_args(argv))
    except (PromptFileError, PairError, PushError, TokenizerError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
