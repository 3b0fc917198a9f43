"""Which checkpoint a run resumes from."""

from __future__ import annotations

from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from .settings import SettingsError


def resume_target(training_args) -> str | None:
    """The checkpoint to resume from: resume_from_checkpoint is a path, or "true" for the newest
    checkpoint-* in output_dir (the command line hands the flag over as a string)."""
    resume = training_args.resume_from_checkpoint
    if resume in (None, False) or str(resume).lower() == "false":
        return None
    if resume is True or str(resume).lower() == "true":
        folder = Path(training_args.output_dir)
        latest = get_last_checkpoint(str(folder)) if folder.is_dir() else None
        if latest is None:
            raise SettingsError(f"resume_from_checkpoint: no checkpoint-* in {folder} to resume from")
        return latest
    if not Path(resume).is_dir():
        raise SettingsError(f"resume_from_checkpoint={resume}: no such checkpoint folder")
    return str(resume)
