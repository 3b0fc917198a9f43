"""Where the inputs come from: a local folder or file, or a Hub repository. Checked in seconds,
before anything large is read, so that a typo or an unreachable Hub is said to be one, instead of
surfacing as a minute of retries and a chained traceback from deep inside a loader."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

OFFLINE_HINT = (
    "if it was downloaded before, set HF_HUB_OFFLINE=1 to use the local cache; otherwise download it "
    "where the Hub is reachable, or give a local folder"
)


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id ("owner/name"): it starts like a path, has more than one
    separator, or its first component is an existing folder."""
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or "\\" in name
        or name.count("/") > 1
        or ("/" in name and Path(name.split("/")[0]).is_dir())
    )


def _in_hub_cache(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import constants

    folder = f"{repo_type}s--{repo_id.replace('/', '--')}"
    return (Path(constants.HF_HUB_CACHE) / folder).is_dir()


def hub_problem(repo_id: str, repo_type: str, revision: str | None = None) -> str | None:
    """None if the repository can be had (reachable, or cached when offline), else why not."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    kind = "model" if repo_type == "model" else "dataset"
    if constants.HF_HUB_OFFLINE or (repo_type == "dataset" and os.environ.get("HF_DATASETS_OFFLINE") == "1"):
        if _in_hub_cache(repo_id, repo_type):
            return None
        return f"{repo_id}: no such local folder, and not in the local Hub cache (HF_HUB_OFFLINE is set)"
    info = HfApi().model_info if repo_type == "model" else HfApi().dataset_info
    try:
        info(repo_id, revision=revision, timeout=10)
    except GatedRepoError:
        return f"{repo_id}: the {kind} is gated: accept its terms on huggingface.co and log in (hf auth login)"
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return f"{repo_id}: no such local folder, and no such {kind} on the Hub (or it is private: hf auth login)"
    except Exception as err:  # no network, DNS, proxy, timeout: all mean "cannot reach the Hub"
        if _in_hub_cache(repo_id, repo_type):
            return None  # the loaders fall back to the cached copy
        return f"{repo_id}: no such local folder, and the Hub cannot be reached to fetch it ({type(err).__name__}); {OFFLINE_HINT}"
    return None


def model_problem(name: str, revision: str | None = None) -> str | None:
    """None if `name` is a model folder or a reachable (or cached) Hub model, else what is wrong."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("config.json", "adapter_config.json", "tokenizer_config.json")):
            return f"{name} is a folder but not a model folder (no config.json)"
        return None
    if path.exists():
        return f"{name} is a file; give a model folder or a Hub id"
    hint = "; build the tiny CPU model with: python tools/random_model.py build/tiny-mistral" if "tiny-mistral" in name else ""
    if _looks_local(name):
        return f"model folder {name} does not exist{hint}"  # else it may be a Hub id: its message says both
    problem = hub_problem(name, "model", revision)
    return problem + hint if problem else None


def dataset_problem(name: str) -> str | None:
    """For a Hub dataset id (local files are checked by the reader): None if it can be had."""
    if Path(name).exists() or Path(name).suffix or name.startswith(("http://", "https://")):
        return None  # a local file or folder, a URL: the reader says what is wrong with it
    if _looks_local(name):
        return f"dataset folder {name} does not exist"
    return hub_problem(name, "dataset")


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
