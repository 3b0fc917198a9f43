"""Where a model comes from: a local folder or a Hub repository, checked in seconds before anything large
is read, and a fingerprint of its stored weights that tells two models of the same shape apart."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..hub import hub_problem, looks_local

MODEL_FILES = ("config.json", "adapter_config.json", "tokenizer_config.json")


def model_problem(name: str, revision: str | None = None, need_tokenizer: bool = False) -> str | None:
    """None if `name` is a model folder or a reachable (or cached) Hub model, else what is wrong; with
    need_tokenizer (training reads the base's tokenizer), a local folder must hold one."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in MODEL_FILES):
            hint = ("; it holds a .gguf file: turn it into a model folder first with python tools/base_from_gguf.py"
                    if any(path.glob("*.gguf")) else "")
            return f"{name} is a folder but not a model folder (no config.json){hint}"
        return _folder_problem(path, name, need_tokenizer)
    if path.exists():
        if path.suffix == ".gguf":
            return f"{name} is a GGUF file: turn it into a model folder first with python tools/base_from_gguf.py {name} <folder>"
        return f"{name} is a file; give a model folder or a Hub id"
    hint = "; build the tiny CPU model with: python tools/random_model.py build/tiny-mistral" if "tiny-mistral" in name else ""
    if looks_local(name):
        return f"model folder {name} does not exist{hint}"  # else it may be a Hub id: its message says both
    problem = hub_problem(name, "model", revision)
    return problem + hint if problem else None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _folder_problem(path: Path, name: str, need_tokenizer: bool) -> str | None:
    """A local model folder that a loader would fail on: an adapter where a base belongs, a config.json that is
    not JSON, no tokenizer."""
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        try:
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except ValueError:
            base = None
        return (f"{name} is a LoRA adapter (trained on {base or 'another base'}), not a base model: give its base as "
                "model_name_or_path, or merge it into the base first (eval_compare.py writes the merged model)")
    config = path / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            return f"{config} is not valid JSON ({err}): the folder is damaged; copy or convert the model again"
    if problem := _own_code_problem(path, name):
        return problem
    if need_tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        return (f"{name} has no tokenizer ({', '.join(TOKENIZER_FILES)}): copy the base's tokenizer files into it, "
                "as they were published with the model")
    return None


def _own_code_problem(path: Path, name: str) -> str | None:
    """A folder that only its own Python code can load: an auto_map (config.json's or tokenizer_config.json's)
    naming classes for a model type transformers does not know. Asked to load it, transformers would offer on a
    terminal to run that code; this project passes trust_remote_code=False everywhere and refuses it here, in
    one message, before anything loads."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    configs = {file: _json_or_empty(path / file) for file in ("config.json", "tokenizer_config.json")}
    with_code = [file for file, config in configs.items() if config.get("auto_map")]
    model_type = configs["config.json"].get("model_type")
    if not with_code or model_type in CONFIG_MAPPING:
        return None  # a known type loads with transformers' own classes, whatever the auto_map says
    return (f"{name} is a model that runs its own Python code: its {' and '.join(with_code)} map it to classes in "
            f"the folder (auto_map), for a model type ({model_type!r}) that transformers {transformers.__version__} "
            "does not know. This pipeline never runs a model folder's code: use a base whose type transformers has "
            "built in (Mistral, Llama, Qwen2, Gemma 3, ...)")


def _json_or_empty(file: Path) -> dict:
    try:
        loaded = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def model_fingerprint(name: str, revision: str | None = None) -> str | None:
    """A short hash of a model's weights as stored: the first 64 KiB of tensor data in each of its
    safetensors files. Two models of the same shape (another seed, a fine-tuned variant) differ
    there; None when no weight file is at hand (a Hub model not downloaded yet)."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(name, revision=revision, allow_patterns=["*.safetensors"], local_files_only=True))
        except Exception:  # not in the cache: nothing to read without a download
            return None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as weights:
            header_length = int.from_bytes(weights.read(8), "little")  # safetensors: u64 length, JSON header, data
            weights.seek(8 + header_length)
            digest.update(weights.read(65536))
    return digest.hexdigest()[:16]
