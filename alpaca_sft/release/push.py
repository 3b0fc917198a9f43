"""Uploading a merged model and its card through huggingface_hub. The token is never handled here:
huggingface_hub reads HF_TOKEN or the login cache itself."""

from __future__ import annotations

import os
import shlex
from pathlib import Path


class PushError(RuntimeError):
    pass


def _without_token(message: str) -> str:
    token = os.environ.get("HF_TOKEN")
    return message.replace(token, "***") if token else message


def check_can_push(repo_id: str) -> str:
    """Before hours of merging and generating: the Hub answers and knows the token. Returns the user."""
    from huggingface_hub import HfApi

    try:
        return HfApi().whoami()["name"]
    except Exception as err:
        raise PushError(
            f"cannot push to {repo_id}: {_without_token(str(err)) or type(err).__name__}. "
            "Log in (hf auth login, or set HF_TOKEN) and check that the Hub can be reached, or leave out --push_to_hub"
        ) from None


def push(folder: Path, repo_id: str, private: bool, card) -> str:
    """Create the repo, upload the folder, then the card as its README.md (never written into a
    folder that is not ours)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload merged model from alpaca-sft", ignore_patterns=["README.md"])
        # upload_file, not ModelCard.push_to_hub: huggingface_hub 1.x (the GPU image has 1.33) validates a card at
        # a fixed huggingface.co address, past HF_ENDPOINT (a mirror, or a test server); 2.x asks HF_ENDPOINT
        api.upload_file(path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id=repo_id,
                        repo_type="model", commit_message="Model card from alpaca-sft")
    except Exception as err:
        raise PushError(
            f"push to {repo_id} failed: {_without_token(str(err))}\nThe merged model is complete in {folder}. Retry with:\n"
            f"  hf upload {shlex.quote(repo_id)} {shlex.quote(str(folder))} .{' --private' if private else ''}"
        ) from None
    return getattr(commit, "commit_url", None) or str(commit)
