"""Write a model folder as one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.

    python tools/export_gguf.py runs/my-comparison/merged build/my-model-q8_0.gguf --type q8_0
    ollama create my-model -f build/my-model-q8_0.Modelfile && ollama run my-model "Name three primary colors."
    llama-cli -m build/my-model-q8_0.gguf -p "..."       # or llama-server, LM Studio: the same file

--type bf16 | f16 | q8_0 are written here in pure Python (no compiler, no llama.cpp checkout); the K-quants
(q4_k_m, q5_k_m, q6_k) through llama.cpp's llama-quantize, whose path --llama_quantize gives. A LoRA adapter
is merged first (eval_compare.py writes the merged model, and with --gguf the GGUF too). Families: Mistral,
Llama, Qwen2, Gemma 3 (alpaca_sft/release/gguf_export.py says what llama.cpp needs of each).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alpaca_sft.release.gguf_export import TYPES, ExportError, export_gguf, write_modelfile  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a model folder: config.json, safetensors weights, tokenizer.json")
    parser.add_argument("out", help="the .gguf file to write")
    parser.add_argument("--type", default="q8_0", choices=TYPES, help="q8_0 (default): about half of bf16's size")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    parser.add_argument("--name", help="the model's name in the file (default: the output file's name)")
    parser.add_argument("--llama_quantize", metavar="PATH", help="llama.cpp's llama-quantize binary, for the K-quants")
    args = parser.parse_args(argv)
    report = export_gguf(args.model_dir, args.out, args.type, overwrite=args.overwrite, name=args.name,
                         llama_quantize=args.llama_quantize)
    modelfile = write_modelfile(report["path"])
    print(f"wrote {report['path']}: {report['architecture']}, {report['type']}, {report['tensors']} tensors, "
          f"{report['bytes'] / 2**20:,.1f} MiB; {modelfile} (ollama create NAME -f {modelfile})")
    for note in report["notes"]:
        print(f"note: {note}")
    return report


if __name__ == "__main__":
    try:
        main()
    except ExportError as err:
        sys.exit(f"error: {err}")
