"""The GGUF export (tools/export_gguf.py) checked by the real client: llama.cpp itself, through llama-cpp-python,
which PyPI ships only as source that vendors llama.cpp and builds it with cmake and a C++ compiler.

    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python     # llama.cpp built: 58 min on 2 busy CPU cores
    python bench/gguf_llamacpp.py tiny --out bench/results/gguf-llamacpp
        every family's tiny random model (tools/random_model.py) written as bf16 and q8_0 and run by llama.cpp:
        its logits against transformers' on the source (weights rounded as the file stores them), and its token
        ids of real Alpaca records against the source tokenizer's
    python bench/gguf_llamacpp.py answers MERGED_DIR --prompts data/heldout_alpaca.jsonl --limit 100 \\
            --max_new_tokens 256 --out bench/results/gguf-llamacpp
        a merged model folder written as bf16 and q8_0; greedy answers to the held-out prompts by llama.cpp from
        each file and by transformers from the folder (one prompt at a time, fp32 compute on the weights rounded
        to bf16): the share of identical answers, of identical first 32 tokens, of answers llama.cpp stops by EOS,
        of prompts both tokenize alike; and q8_0 against bf16 in llama.cpp

Everything runs on the CPU; each run prints its figures and writes them as JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))  # random_model

import numpy as np
import torch

KINDS = ("bf16", "q8_0")
FIRST = 32  # "identical first 32 tokens"


def llama_cpp_model(path: Path, logits_all: bool = False, n_ctx: int = 2048):
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama-cpp-python is not installed: CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python "
                 "(builds llama.cpp from source: cmake and a C++ compiler)")
    return Llama(str(path), n_ctx=n_ctx, n_threads=torch.get_num_threads(), logits_all=logits_all, verbose=False)


def llama_cpp_logits(llm, ids: torch.Tensor) -> np.ndarray:
    """llama.cpp's logits at every position of one row of token ids."""
    llm.reset()
    llm.eval(ids[0].tolist())
    return np.array(llm.scores[: ids.shape[1]])


def rounded_source(folder: Path):
    """The folder's model with its matrices rounded to bf16 as the bf16 file stores them (norms and biases stay
    fp32, as there), computing in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.copy_(weight.to(torch.bfloat16).float())
    return model


def alpaca_texts(limit: int = 12) -> list[str]:
    from alpaca_sft.data.template import render_prompt

    rows = [json.loads(line) for line in Path("data/heldout_alpaca.jsonl").read_text(encoding="utf-8").splitlines()]
    return [render_prompt(row["instruction"], row["input"]) + row["output"] for row in rows[:limit]]


# --- tiny: every family's random model --------------------------------------------------------------------------

def tiny(args) -> dict:
    from random_model import ARCHITECTURES, build_random_model
    from transformers import AutoTokenizer

    from alpaca_sft.release.gguf_export import export_gguf

    texts, results = alpaca_texts(), {}
    ids = torch.randint(0, 700, (1, 40), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as scratch:
        for arch in ARCHITECTURES:
            source = build_random_model(Path(scratch) / arch, arch)
            with torch.no_grad():
                want = rounded_source(source)(ids).logits[0].numpy()
            tokenizer = AutoTokenizer.from_pretrained(source)
            for kind in KINDS:
                path = export_gguf(source, Path(scratch) / f"{arch}-{kind}.gguf", kind)["path"]
                llm = llama_cpp_model(path, logits_all=True)
                got = llama_cpp_logits(llm, ids)
                same_ids = sum(llm.tokenize(t.encode(), add_bos=True, special=False) == tokenizer(t)["input_ids"]
                               for t in texts)
                results[f"{arch}-{kind}"] = {
                    "max_abs_logit_diff": float(np.abs(got - want).max()), "logit_scale": float(np.abs(want).max()),
                    "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
                    "alpaca_texts_tokenized_alike": f"{same_ids}/{len(texts)}"}
                print(f"{arch:8s} {kind:5s} {results[f'{arch}-{kind}']}")
                del llm
        results |= controls(Path(scratch), ids)
    return results


def controls(scratch: Path, ids: torch.Tensor) -> dict:
    """The same comparison for files written without one of llama.cpp's transforms: Llama's q/k rows left in
    transformers' order, Gemma's norms without their offset. What a wrong file looks like in llama.cpp."""
    import dataclasses

    from alpaca_sft.release import gguf_export

    results = {}
    for model_type, change in (("llama", {"pairs_rotated": False}), ("gemma3_text", {"norm_offset": 0.0})):
        arch = model_type.split("_")[0]
        family = gguf_export.FAMILIES[model_type]
        gguf_export.FAMILIES[model_type] = dataclasses.replace(family, **change)
        try:
            path = gguf_export.export_gguf(scratch / arch, scratch / f"{arch}-without-{next(iter(change))}.gguf",
                                           "bf16")["path"]
        finally:
            gguf_export.FAMILIES[model_type] = family
        with torch.no_grad():
            want = rounded_source(scratch / arch)(ids).logits[0].numpy()
        got = llama_cpp_logits(llama_cpp_model(path, logits_all=True), ids)
        results[path.stem] = {"max_abs_logit_diff": float(np.abs(got - want).max()),
                              "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean())}
        print(f"{path.stem}: {results[path.stem]}")
    return results


# --- answers: a merged model's greedy answers -------------------------------------------------------------------

def transformers_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    answers = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answers.append(output[0, inputs["input_ids"].shape[1]:].tolist())
    return answers


def llama_cpp_answers(path: Path, prompts: list[str], max_new_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy (temperature 0, no repeat penalty) answers, ending with the EOS when llama.cpp stopped by it; and
    each prompt's token ids as llama.cpp reads them."""
    llm = llama_cpp_model(path)
    eos, answers, prompt_ids = llm.token_eos(), [], []
    for prompt in prompts:
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        prompt_ids.append(tokens)
        answer = []
        llm.reset()  # each prompt evaluated whole: no cache of the previous prompt's shared preamble
        for token in llm.generate(tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            answer.append(token)
            if token == eos or len(answer) == max_new_tokens:
                break
        answers.append(answer)
    return answers, prompt_ids


def chat_template_check(path: Path, max_new_tokens: int, count: int = 10) -> dict:
    """llama.cpp's chat API (the file's chat template) against the Alpaca prompt itself, on held-out instructions
    without an input: the share of identical greedy answers."""
    from alpaca_sft.data.template import render_prompt

    rows = [json.loads(line) for line in Path("data/heldout_alpaca.jsonl").read_text(encoding="utf-8").splitlines()]
    instructions = [row["instruction"] for row in rows if not row["input"].strip()][:count]
    llm, same = llama_cpp_model(path), 0
    for instruction in instructions:
        greedy = dict(max_tokens=max_new_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0)
        llm.reset()  # each prompt evaluated whole, as below: a reused cache would change the arithmetic
        chat = llm.create_chat_completion(messages=[{"role": "user", "content": instruction}], **greedy)
        llm.reset()
        plain = llm.create_completion(render_prompt(instruction), **greedy)
        same += chat["choices"][0]["message"]["content"].strip() == plain["choices"][0]["text"].strip()
    return {"instructions": len(instructions), "identical_answers": same / len(instructions)}


def agreement(ours: list[list[int]], theirs: list[list[int]], eos: int) -> dict:
    n = len(ours)
    return {"identical_answers": sum(a == b for a, b in zip(ours, theirs)) / n,
            f"identical_first_{FIRST}_tokens": sum(a[:FIRST] == b[:FIRST] for a, b in zip(ours, theirs)) / n,
            "stopped_by_eos": sum(bool(a) and a[-1] == eos for a in ours) / n}


def next_token_gaps(paths: dict[str, Path], model, tokenizer, prompts: list[str]) -> dict:
    """Teacher-forced, on each prompt's own tokens: how often each file's most likely next token is transformers'
    (and q8_0's is bf16's), and the mean and largest |logit difference|."""
    logits = {"transformers": []}
    for prompt in prompts:
        with torch.no_grad():
            logits["transformers"].append(model(**tokenizer(prompt, return_tensors="pt")).logits[0].numpy())
    for kind, path in paths.items():
        llm = llama_cpp_model(path, logits_all=True, n_ctx=512)
        logits[kind] = [llama_cpp_logits(llm, tokenizer(p, return_tensors="pt")["input_ids"]) for p in prompts]
        del llm
    gaps = {}
    for ours, theirs in (("bf16", "transformers"), ("q8_0", "transformers"), ("q8_0", "bf16")):
        a, b = np.concatenate(logits[ours]), np.concatenate(logits[theirs])
        gaps[f"{ours} vs {theirs}"] = {"top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
                                       "mean_abs_logit_diff": float(np.abs(a - b).mean()),
                                       "max_abs_logit_diff": float(np.abs(a - b).max()), "positions": len(a)}
    return gaps


def answers(args) -> dict:
    from transformers import AutoTokenizer

    from alpaca_sft.eval.prompts import read_prompt_files
    from alpaca_sft.release.gguf_export import export_gguf

    folder = Path(args.model_dir)
    prompts = [p.prompt for p in read_prompt_files(args.prompts)][: args.limit]
    model, tokenizer = rounded_source(folder), AutoTokenizer.from_pretrained(folder)
    eos = tokenizer.eos_token_id
    started = time.perf_counter()
    reference = transformers_answers(model, tokenizer, prompts, args.max_new_tokens)
    result = {"model_dir": str(folder), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "transformers": {"stopped_by_eos": agreement(reference, reference, eos)["stopped_by_eos"],
                               "seconds": round(time.perf_counter() - started, 1)}}
    print(f"transformers: {result['transformers']}")
    generated, paths = {}, {}
    for kind in KINDS:
        path = export_gguf(folder, Path(args.gguf_dir) / f"model-{kind}.gguf", kind, overwrite=True)["path"]
        paths[kind] = path
        started = time.perf_counter()
        generated[kind], prompt_ids = llama_cpp_answers(path, prompts, args.max_new_tokens)
        result[f"llama.cpp {kind}"] = dict(agreement(generated[kind], reference, eos), **{
            "prompts_tokenized_alike": sum(ids == tokenizer(p)["input_ids"] for ids, p in zip(prompt_ids, prompts))
            / len(prompts), "seconds": round(time.perf_counter() - started, 1),
            "file_mib": round(path.stat().st_size / 2**20, 1)})
        print(f"llama.cpp {kind} vs transformers: {result[f'llama.cpp {kind}']}")
    result["llama.cpp q8_0 vs bf16"] = agreement(generated["q8_0"], generated["bf16"], eos)
    print(f"llama.cpp q8_0 vs llama.cpp bf16: {result['llama.cpp q8_0 vs bf16']}")
    result["chat template (q8_0)"] = chat_template_check(paths["q8_0"], args.max_new_tokens)
    print(f"llama.cpp's chat API vs the prompt itself: {result['chat template (q8_0)']}")
    result["next token, teacher-forced on the prompts"] = next_token_gaps(paths, model, tokenizer, prompts[:20])
    print(f"next token on the first 20 prompts: {result['next token, teacher-forced on the prompts']}")
    (Path(args.out) / "answer-tokens.json").write_text(json.dumps(
        dict(result, answers={"transformers": reference, **generated}), indent=1))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tiny").add_argument("--out", default="bench/results/gguf-llamacpp")
    run = sub.add_parser("answers")
    run.add_argument("model_dir")
    run.add_argument("--prompts", nargs="+", default=["data/heldout_alpaca.jsonl"])
    run.add_argument("--limit", type=int, default=100)
    run.add_argument("--max_new_tokens", type=int, default=256)
    run.add_argument("--out", default="bench/results/gguf-llamacpp")
    run.add_argument("--gguf_dir", default="build/gguf-llamacpp", help="where the GGUF files go (never committed)")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = tiny(args) if args.command == "tiny" else answers(args)
    (Path(args.out) / f"{args.command}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
