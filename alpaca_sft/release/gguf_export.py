"""A model folder (the merged model, or any plain one of the families the pipeline trains) written as one GGUF
file, llama.cpp's format, which llama.cpp, Ollama and LM Studio run; and an Ollama Modelfile beside it.

Written with the `gguf` package (llama.cpp's own Python writer, its tensor-name map and quantizers), in pure
Python, with what llama.cpp's converter (convert_hf_to_gguf.py) does for each family:

- Llama and Mistral (llama.cpp's "llama" architecture) rotate adjacent pairs of a head's dimensions, where
  transformers rotates its two halves: the rows of q_proj and k_proj are reordered (per head, and per key-value
  head for k). Qwen2 and Gemma 3 rotate halves in llama.cpp too and keep their order.
- Gemma's RMSNorm scales by (1 + weight); llama.cpp stores the sum.
- Tied embeddings: no output.weight, which llama.cpp reads as "the LM head is token_embd".
- Norms, biases and other 1-D tensors stay F32 (llama.cpp's kernels expect it); a Q8_0 file keeps in F16 a
  matrix whose rows are not a whole number of 32-value blocks.

Weights stream from the safetensors files one tensor at a time into a temporary file, renamed once whole.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.template import PROMPT_WITH_INPUT
from .gguf_tokenizer import ALPACA_PROMPT_AROUND, ExportError, read_tokenizer, write_tokenizer


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("writing a GGUF needs the gguf package: pip install gguf (or: pip install -e '.[gguf]')") \
            from None
    return gguf


# --type: written here, in pure Python; K-quants only by llama.cpp's llama-quantize, from a bf16 file written here.
OWN_TYPES = ("bf16", "f16", "q8_0")
K_QUANTS = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
TYPES = OWN_TYPES + tuple(K_QUANTS)


@dataclass(frozen=True)
class Family:
    arch: str  # llama.cpp's architecture name
    pairs_rotated: bool  # llama.cpp's rope rotates adjacent pairs: q/k rows reordered from transformers' halves
    norm_offset: float  # added to every norm weight (Gemma: 1)


FAMILIES = {  # config.json's model_type
    "mistral": Family("llama", True, 0.0),
    "llama": Family("llama", True, 0.0),
    "qwen2": Family("qwen2", False, 0.0),
    "gemma3_text": Family("gemma3", False, 1.0),
}


# --- the folder ---------------------------------------------------------------------------------------------------

def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{path} is not valid JSON ({err}): the folder is damaged") from None


def read_folder(model_dir: Path) -> tuple[dict, Family]:
    """config.json and the family, or why this folder cannot be exported; nothing large is read."""
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: no such folder (give a model folder: config.json, safetensors, tokenizer)")
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        base = _json(model_dir / "adapter_config.json").get("base_model_name_or_path") or "BASE"
        raise ExportError(f"{model_dir} is a LoRA adapter, not a model: merge it into its base first, with\n"
                          f"  python eval_compare.py --base {base} --tuned {model_dir}\n"
                          f"which writes the merged model to {model_dir}-comparison/merged (its --gguf exports it too)")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} holds no config.json: not a model folder")
    config = _json(model_dir / "config.json")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ExportError(f"{model_dir}: model_type {model_type!r} is not a family this writer knows "
                          f"({', '.join(FAMILIES)})")
    if not list(model_dir.glob("*.safetensors")):
        raise ExportError(f"{model_dir} holds no .safetensors weights (save the model with save_pretrained)")
    return config, FAMILIES[model_type]


def _config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False).get_text_config()


def card_metadata(model_dir: Path) -> dict:
    """The YAML front matter of the folder's README.md (eval_compare.py writes base_model and license there)."""
    from huggingface_hub.repocard import metadata_load

    card = model_dir / "README.md"
    return (metadata_load(card) or {}) if card.is_file() else {}


# --- hyperparameters ----------------------------------------------------------------------------------------------

def _rope(writer, rope: dict, head_dim: int) -> list[tuple[str, np.ndarray]]:
    """The rope scaling llama.cpp can express; returns the extra tensor Llama 3's scaling needs."""
    gguf = _gguf()
    kind = rope.get("rope_type", "default")
    writer.add_rope_freq_base(rope["rope_theta"])
    if kind == "default":
        return []
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
        return []
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor)):
            if rope.get(key) is not None:
                add(rope[key])
        return []
    if kind == "llama3":
        return [("rope_freqs.weight", llama3_rope_factors(rope, head_dim))]
    raise ExportError(f"rope scaling {kind!r} is not one this writer expresses (default, linear, yarn, llama3)")


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama 3's rope scaling as llama.cpp takes it: the factor each rotary frequency is divided by."""
    frequencies = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelengths = 2 * math.pi / frequencies
    context, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    smooth = np.clip((context / wavelengths - low) / (high - low), 0, 1)
    return (1 / ((1 - smooth) / rope["factor"] + smooth)).astype(np.float32)


def _unexpressible(config, family: Family) -> str | None:
    if family.arch == "qwen2" and getattr(config, "use_sliding_window", False):
        return "Qwen2 with use_sliding_window: llama.cpp's qwen2 has no sliding window"
    if family.arch == "gemma3":
        if config.attn_logit_softcapping is not None:
            return "Gemma 3 with attn_logit_softcapping: llama.cpp's gemma3 has none"
        if config.query_pre_attn_scalar != config.head_dim:
            return (f"Gemma 3 with query_pre_attn_scalar {config.query_pre_attn_scalar} != head_dim {config.head_dim}: "
                    "llama.cpp scales queries by 1/sqrt(head_dim)")
    return None


def write_hyperparameters(writer, config, family: Family) -> list[tuple[str, np.ndarray]]:
    """The keys llama.cpp reads for the family; returns any tensor they imply (Llama 3's rope factors)."""
    if problem := _unexpressible(config, family):
        raise ExportError(f"this model cannot be written as llama.cpp runs it: {problem}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = config.rope_parameters
    if family.arch != "gemma3":
        return _rope(writer, rope, head_dim)
    # Gemma 3: full-attention layers with their rope (and its scaling), sliding ones with their own base and
    # window; which layer is which, stated per layer (llama.cpp otherwise assumes 5 sliding to 1 full).
    extra = _rope(writer, rope["full_attention"], head_dim)
    writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    return extra


# --- the tensors --------------------------------------------------------------------------------------------------

@dataclass
class PlannedTensor:
    name: str  # llama.cpp's
    source: str | None  # the safetensors key, or None for a tensor computed here (values given)
    shape: tuple[int, ...]
    kind: int  # GGMLQuantizationType
    values: np.ndarray | None = None


def _source_shapes(model_dir: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    from safetensors import safe_open

    shapes = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            shapes.update({key: (tuple(handle.get_slice(key).get_shape()), file) for key in handle.keys()})
    return shapes


def _needed_parameters(config) -> set[str]:
    """Every parameter the model the config describes has (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return set(model.state_dict())


def _storage_kind(name: str, shape: tuple[int, ...], wanted: str) -> int:
    gguf = _gguf()
    kinds = gguf.GGMLQuantizationType
    if len(shape) == 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return kinds.F32
    if wanted == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[kinds.Q8_0][0]:
        return kinds.F16
    return {"bf16": kinds.BF16, "f16": kinds.F16, "q8_0": kinds.Q8_0}[wanted]


def plan_tensors(model_dir: Path, config, family: Family, wanted: str, extra) -> list[PlannedTensor]:
    """What the file will hold, named and typed, or which tensors the folder lacks or holds beyond the model."""
    gguf = _gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch.upper()], config.num_hidden_layers)
    shapes, needed = _source_shapes(model_dir), _needed_parameters(config)
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        needed.discard("lm_head.weight")  # llama.cpp reads a file without output.weight as tied
    missing, unexpected = sorted(needed - set(shapes)), sorted(set(shapes) - needed - {"lm_head.weight"})
    if missing or unexpected:
        raise ExportError(f"{model_dir}: its weights are not those of the {config.model_type} model its config "
                          f"describes: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                          f"unexpected {unexpected[:4]}")
    planned = [PlannedTensor(name, None, values.shape, gguf.GGMLQuantizationType.F32, values) for name, values in extra]
    for key in sorted(needed):
        module, suffix = key.rsplit(".", 1)
        mapped = names.get_name(module)
        if mapped is None:
            raise ExportError(f"{model_dir}: no llama.cpp name for {key} in a {family.arch} model")
        name, shape = f"{mapped}.{suffix}", shapes[key][0]
        planned.append(PlannedTensor(name, key, shape, _storage_kind(f"{mapped}.{suffix}", shape, wanted)))
    return planned


def permute_for_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q_proj/k_proj rows from transformers' layout (per head: the first halves of the rotated pairs, then the
    seconds) into llama.cpp's (the two of each pair adjacent); as its converter's LlamaModel.permute."""
    rows_per_half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, rows_per_half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_values(key: str, weight: torch.Tensor, config, family: Family) -> np.ndarray:
    """One source tensor as llama.cpp expects its values, in float32."""
    weight = weight.float()
    if family.pairs_rotated and key.endswith(("q_proj.weight", "q_proj.bias")):
        weight = permute_for_pairs(weight, config.num_attention_heads)
    elif family.pairs_rotated and key.endswith(("k_proj.weight", "k_proj.bias")):
        weight = permute_for_pairs(weight, config.num_key_value_heads)
    if family.norm_offset and key.endswith("norm.weight"):
        weight = weight + family.norm_offset
    return weight.contiguous().numpy()


def _encoded(values: np.ndarray, kind: int) -> np.ndarray:
    gguf = _gguf()
    kinds = gguf.GGMLQuantizationType
    return values if kind == kinds.F32 else gguf.quants.quantize(values, kinds(kind))


def _declare(writer, tensor: PlannedTensor) -> None:
    gguf = _gguf()
    kinds = gguf.GGMLQuantizationType
    if tensor.kind in (kinds.F32, kinds.F16):
        dtype = np.float32 if tensor.kind == kinds.F32 else np.float16
        nbytes = math.prod(tensor.shape) * np.dtype(dtype).itemsize
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(dtype), nbytes)
        return
    byte_shape = gguf.quant_shape_to_byte_shape(tensor.shape, kinds(tensor.kind))
    writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape),
                           raw_dtype=kinds(tensor.kind))


def stream_tensors(writer, model_dir: Path, planned: list[PlannedTensor], config, family: Family) -> None:
    """Each tensor read, transformed, encoded and written in turn: one tensor in memory at a time."""
    from safetensors import safe_open

    files = {key: file for key, (_, file) in _source_shapes(model_dir).items()}
    for tensor in planned:
        if tensor.source is None:
            values = tensor.values
        else:
            with safe_open(str(files[tensor.source]), "pt") as handle:
                values = gguf_values(tensor.source, handle.get_tensor(tensor.source), config, family)
        writer.write_tensor_data(_encoded(values, tensor.kind))


# --- the file -----------------------------------------------------------------------------------------------------

def write_general(writer, name: str, wanted: str, card: dict) -> None:
    gguf = _gguf()
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    file_types = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[wanted])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if card.get("license"):
        writer.add_license(card["license"])
    bases = card.get("base_model") or []
    bases = [bases] if isinstance(bases, str) else bases
    if bases:
        writer.add_base_model_count(len(bases))
        for i, base in enumerate(bases):
            writer.add_base_model_name(i, base)


def _disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _write_whole(out_path: Path, write) -> None:
    """write(partial_path) fills a temporary file beside out_path, renamed to it once complete; on any failure the
    partial file is removed, so that no file that looks whole is ever half-written."""
    partial = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    try:
        write(partial)
        with partial.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, out_path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        if _disk_full(err):
            raise ExportError(f"the disk holding {out_path.parent} is full: the partial {out_path.name} was removed; "
                              "free some space and run again") from None
        raise ExportError(f"cannot write {out_path}: {err.strerror or err}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _check_output(out_path: Path, overwrite: bool) -> None:
    if out_path.is_dir():
        raise ExportError(f"{out_path} is a folder: give the path of the .gguf file to write")
    if out_path.exists() and not overwrite:
        raise ExportError(f"{out_path} exists: pass --overwrite to replace it, or give another path")
    if out_path.suffix != ".gguf":
        raise ExportError(f"{out_path}: give the output a .gguf name, as llama.cpp and Ollama expect")


def export_gguf(model_dir: str | Path, out_path: str | Path, wanted: str = "q8_0", *, overwrite: bool = False,
                name: str | None = None, llama_quantize: str | None = None) -> dict:
    """Write model_dir as one GGUF of type `wanted` (TYPES); returns what was written (path, notes, tensor count).
    Everything that can be refused is refused before a byte is written."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    if wanted not in TYPES:
        raise ExportError(f"--type {wanted}: not a type this writer knows ({', '.join(TYPES)})")
    _check_output(out_path, overwrite)
    if wanted in K_QUANTS:
        return _k_quant(model_dir, out_path, wanted, name or out_path.stem, llama_quantize)
    return _export(model_dir, out_path, wanted, name or out_path.stem)


def _export(model_dir: Path, out_path: Path, wanted: str, name: str) -> dict:
    raw, family = read_folder(model_dir)
    config = _config(model_dir)
    tokenizer = read_tokenizer(model_dir, config.vocab_size)
    writer = _gguf().GGUFWriter(None, family.arch)
    write_general(writer, name, wanted, card_metadata(model_dir))
    extra = write_hyperparameters(writer, config, family)
    write_tokenizer(writer, tokenizer)
    planned = plan_tensors(model_dir, config, family, wanted, extra)
    for tensor in planned:
        _declare(writer, tensor)

    def write(partial: Path) -> None:
        try:
            writer.write_header_to_file(partial)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            stream_tensors(writer, model_dir, planned, config, family)
        finally:
            writer.close()

    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_whole(out_path, write)
    notes = []
    if raw.get("model_type") == "mistral" and raw.get("sliding_window"):
        notes.append(f"Mistral's {raw['sliding_window']}-token sliding window is not in the file (llama.cpp's llama "
                     "architecture has none): the same answers for contexts up to that length")
    return {"path": out_path, "type": wanted, "architecture": family.arch, "tensors": len(planned),
            "bytes": out_path.stat().st_size, "tokenizer": tokenizer.model, "notes": notes}


def _k_quant(model_dir: Path, out_path: Path, wanted: str, name: str, llama_quantize: str | None) -> dict:
    """A K-quant: the bf16 file written here, then llama.cpp's llama-quantize, whose mixes of block types (which
    tensors get more bits) are its own."""
    if not llama_quantize:
        raise ExportError(f"--type {wanted} is a K-quant, which only llama.cpp's llama-quantize writes: pass its "
                          "path with --llama_quantize (build it in a llama.cpp checkout: cmake -B build && "
                          "cmake --build build --target llama-quantize); bf16, f16 and q8_0 need nothing else")
    binary = shutil.which(llama_quantize)
    if binary is None:
        raise ExportError(f"--llama_quantize {llama_quantize}: no such executable file")
    bf16 = out_path.with_name(f".{out_path.name}.bf16-{os.getpid()}")
    try:
        report = _export(model_dir, bf16, "bf16", name)

        def write(partial: Path) -> None:
            done = subprocess.run([binary, str(bf16), str(partial), K_QUANTS[wanted]], capture_output=True, text=True)
            if done.returncode != 0 or not partial.is_file():
                said = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise ExportError(f"llama-quantize ({binary}) failed with exit code {done.returncode}: "
                                  + " | ".join(said))

        _write_whole(out_path, write)
    finally:
        bf16.unlink(missing_ok=True)
    return dict(report, path=out_path, type=wanted, bytes=out_path.stat().st_size)


# --- Ollama, and eval_compare.py's --gguf -------------------------------------------------------------------------

STOP_MARKERS = tuple(re.findall(r"### [A-Za-z]+:", PROMPT_WITH_INPUT))  # Instruction, Input, Response


def write_modelfile(gguf_path: Path) -> Path:
    """An Ollama Modelfile beside the GGUF (`ollama create NAME -f` it): the file, the Alpaca prompt as its template,
    a stop at each of the template's markers (a tuned model that does not stop by EOS starts a new block), greedy
    decoding as the evaluation ran (Ollama's default repeat_penalty 1.1 would change the answers)."""
    gguf_path = Path(gguf_path)
    before, after = ALPACA_PROMPT_AROUND
    template = before + "{{ .Prompt }}" + after
    lines = [f"FROM ./{gguf_path.name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{marker}"' for marker in STOP_MARKERS]
    lines += ["PARAMETER temperature 0", "PARAMETER top_k 1", "PARAMETER repeat_penalty 1"]
    path = gguf_path.with_suffix(".Modelfile")
    _write_whole(path, lambda partial: partial.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return path


def release_name(base: str, repo_id: str | None) -> str:
    """The GGUF's name in eval_compare.py: the Hub repository's, or the base's with -alpaca."""
    return (repo_id or f"{base.rstrip('/')}-alpaca").split("/")[-1]


def export_for_release(merged_dir: Path, output_dir: Path, types: list[str], name: str,
                       llama_quantize: str | None = None) -> list[Path]:
    """eval_compare.py --gguf: each type as NAME-TYPE.gguf beside merged/, each with its Modelfile; the files."""
    written = []
    for wanted in types:
        report = export_gguf(merged_dir, Path(output_dir) / f"{name}-{wanted}.gguf", wanted, overwrite=True, name=name,
                             llama_quantize=llama_quantize)
        written += [report["path"], write_modelfile(report["path"])]
        print(f"wrote {report['path']} ({report['bytes'] / 2**20:,.1f} MiB) and its Ollama Modelfile")
    return written


def push_files(paths: list[Path], repo_id: str) -> None:
    """The GGUF files and Modelfiles into the repository push.py created."""
    from huggingface_hub import HfApi

    from .push import PushError

    api = HfApi()
    for path in paths:
        try:
            api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo_id, repo_type="model",
                            commit_message=f"Upload {path.name} from alpaca-sft")
        except Exception as err:
            said = str(err).replace(os.environ["HF_TOKEN"], "***") if os.environ.get("HF_TOKEN") else str(err)
            raise PushError(f"upload of {path} to {repo_id} failed: {said}\nRetry with: hf upload {repo_id} {path} "
                            f"{path.name}") from None
