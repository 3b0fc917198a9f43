"""The synthetic Alpaca-shaped workload of the speed benchmark, written as an Alpaca JSONL file.

    python bench/workload.py build/alpaca-synthetic.jsonl --model build/tiny-mistral

52,002 records, 40% with an input; instruction, input and output lengths in tokens are drawn once
(seed 0) from log-normal distributions fitted to Alpaca's shape:
    instruction median 14 (sigma 0.5, clipped to 3-120)
    input       median 18 (sigma 0.8, clipped to 2-600)
    output      median 48 (sigma 0.95, clipped to 1-1000)
Each field is built from words that are single Mistral tokens, so a field of n words is n tokens;
the real Alpaca template and EOS are added by the training pipeline, which reports the exact total.
"""

import argparse
import json
import re
from pathlib import Path

import numpy as np

RECORDS = 52_002
SHAPE = {  # field: (median tokens, sigma, low, high)
    "instruction": (14, 0.5, 3, 120),
    "input": (18, 0.8, 2, 600),
    "output": (48, 0.95, 1, 1000),
}


def single_token_words(tokenizer) -> list[str]:
    """Lower-case words that the tokenizer keeps as one piece after a space."""
    words = sorted(piece[1:] for piece in tokenizer.get_vocab() if re.fullmatch("▁[a-z]{3,9}", piece))
    return [w for w in words if len(tokenizer(f"x {w}", add_special_tokens=False)["input_ids"]) == 2]


def lengths(rng, field: str, n: int) -> np.ndarray:
    median, sigma, low, high = SHAPE[field]
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), low, high).astype(int)


def write_workload(path: Path, tokenizer, records: int = RECORDS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = np.array(single_token_words(tokenizer))
    has_input = rng.random(records) < 0.4
    sizes = {field: lengths(rng, field, records) for field in SHAPE}

    def text(n: int) -> str:
        return " ".join(rng.choice(words, n))

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for i in range(records):
            record = {
                "instruction": text(sizes["instruction"][i]),
                "input": text(sizes["input"][i]) if has_input[i] else "",
                "output": text(sizes["output"][i]),
            }
            out.write(json.dumps(record) + "\n")
    return path


if __name__ == "__main__":
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--model", default="build/tiny-mistral", help="a folder with the Mistral tokenizer")
    parser.add_argument("--records", type=int, default=RECORDS)
    args = parser.parse_args()
    print(write_workload(args.path, AutoTokenizer.from_pretrained(args.model, trust_remote_code=False), args.records))
