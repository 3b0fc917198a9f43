"""What `accelerate launch` asked for, read in one place: the launcher's environment variables are the
only record of it before the Trainer builds its Accelerator."""

from __future__ import annotations

import os


def fsdp_enabled() -> bool:
    """accelerate sets ACCELERATE_USE_FSDP for an FSDP config (accelerate_configs/fsdp*.yaml)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE), whether or not they joined one group."""
    return int(os.environ.get("WORLD_SIZE", 1))
