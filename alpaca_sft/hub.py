"""Can a Hub repository be had? Answered in seconds, before anything large is read, so that a typo or an
unreachable Hub is said to be one instead of surfacing as a minute of retries and a chained traceback from
deep inside a loader. Used for model ids (models/sources.py) and dataset ids (data/records.py) alike."""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_HINT = (
    "if it was downloaded before, set HF_HUB_OFFLINE=1 to use the local cache; otherwise download it "
    "where the Hub is reachable, or give a local folder"
)


def looks_local(name: str) -> bool:
    """A path rather than a Hub id ("owner/name"): it starts like a path, has more than one
    separator, or its first component is an existing folder."""
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or "\\" in name
        or name.count("/") > 1
        or ("/" in name and Path(name.split("/")[0]).is_dir())
    )


def in_hub_cache(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import constants

    folder = f"{repo_type}s--{repo_id.replace('/', '--')}"
    return (Path(constants.HF_HUB_CACHE) / folder).is_dir()


def hub_problem(repo_id: str, repo_type: str, revision: str | None = None) -> str | None:
    """None if the repository can be had (reachable, or cached when offline), else why not."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    kind = "model" if repo_type == "model" else "dataset"
    if constants.HF_HUB_OFFLINE or (repo_type == "dataset" and os.environ.get("HF_DATASETS_OFFLINE") == "1"):
        if in_hub_cache(repo_id, repo_type):
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
        if in_hub_cache(repo_id, repo_type):
            return None  # the loaders fall back to the cached copy
        return f"{repo_id}: no such local folder, and the Hub cannot be reached to fetch it ({type(err).__name__}); {OFFLINE_HINT}"
    return None
