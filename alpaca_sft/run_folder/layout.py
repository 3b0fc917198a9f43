"""What a run's folder holds, by name: the run's record, its checkpoints and their seals, and the list of what runs
wrote there.

    output_dir/
      train_config.yaml      every setting of the run (train/run_record.py writes it; record.py reads it)
      run_summary.json       what happened, across interruptions (the same)
      trainer_state.json     transformers' log history
      adapter_*, tokenizer*  the finished adapter, written whole (train/run.py)
      checkpoint-N/          transformers' checkpoints; checkpoint.json in one, written last, seals it as complete
      .run_files.json        every name a run created here, listed before it is written
      .lock                  held by the run in the folder (lock.py)

A file written atomically is written under NAME.tmp and renamed into place."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

CONFIG_FILE, SUMMARY_FILE, TRAINER_STATE = "train_config.yaml", "run_summary.json", "trainer_state.json"
PREVIEW_FILE = "preview.jsonl"  # train_sft.py --preview
RUN_FILES, LOCK_FILE = ".run_files.json", ".lock"
SEAL = "checkpoint.json"  # in checkpoint-N: written after every other file of it
CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")  # transformers names its checkpoints
# Written only by this package, under these names: the pipeline's own whatever the record says.
OWN_FILES = (LOCK_FILE, RUN_FILES, RUN_FILES + ".tmp")
# Any of these, or a checkpoint, makes a folder one that holds a run (a full fine-tune writes model.safetensors).
RUN_MARKERS = ("adapter_config.json", SUMMARY_FILE, "model.safetensors", TRAINER_STATE)
# What a run wrote before runs kept a record (this project until 2026-12-06), by name: in a folder that holds such a
# run (its train_config.yaml or a sealed checkpoint) these are taken as its, so that it can still be resumed or
# replaced.
UNRECORDED_RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md", CONFIG_FILE, SUMMARY_FILE,
                        TRAINER_STATE, "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                        "special_tokens_map.json", "chat_template.jinja", "generation_config.json", PREVIEW_FILE,
                        "training_args.bin", "runs")


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# checkpoint-N and their seals

def checkpoint_name(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def checkpoint_step(checkpoint: Path) -> int:
    return int(CHECKPOINT.match(Path(checkpoint).name).group(1))


def checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders, by step."""
    folder = Path(output_dir)
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=checkpoint_step)


def is_sealed(checkpoint: Path) -> bool:
    return (Path(checkpoint) / SEAL).is_file()


def newest_sealed(output_dir: str | Path) -> tuple[Path | None, list[Path]]:
    """The newest sealed checkpoint, and the unsealed ones newer than it (half-written)."""
    found = checkpoints(output_dir)
    sealed = [p for p in found if is_sealed(p)]
    newest = sealed[-1] if sealed else None
    newer = [p for p in found if not is_sealed(p) and (newest is None or checkpoint_step(p) > checkpoint_step(newest))]
    return newest, newer


def write_seal(checkpoint: Path, seal: dict) -> None:
    write_atomically(Path(checkpoint) / SEAL, json.dumps(seal, indent=2))


def read_seal(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / SEAL).read_text())


def holds_a_run(output_dir: str | Path) -> bool:
    path = Path(output_dir)
    return path.is_dir() and (any((path / m).exists() for m in RUN_MARKERS) or any(path.glob(f"{PREFIX_CHECKPOINT_DIR}-*")))


# .run_files.json: what runs wrote in the folder

def listed(output_dir: str | Path) -> set[str]:
    """The names runs recorded as written in output_dir (for a run from before the record, the names such runs
    wrote; none for a folder that holds no run)."""
    folder = Path(output_dir)
    try:
        return set(json.loads((folder / RUN_FILES).read_text())["files"])
    except FileNotFoundError:
        return _written_before_the_record(folder)


def _written_before_the_record(folder: Path) -> set[str]:
    if not ((folder / CONFIG_FILE).is_file() or any(folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*/{SEAL}"))):
        return set()
    checkpoint = f"{PREFIX_CHECKPOINT_DIR}-"
    return {p.name for p in folder.iterdir() if p.name in UNRECORDED_RUN_FILES or p.name.startswith(checkpoint)}


def record(output_dir: str | Path, *names: str) -> None:
    """List `names` (entries of output_dir) as this run's, before it writes them."""
    folder, files = Path(output_dir), listed(output_dir)
    if not set(names) <= files:
        write_atomically(folder / RUN_FILES, json.dumps({"files": sorted(files | set(names))}, indent=1))


def record_present(output_dir: str | Path) -> None:
    """List whatever is in output_dir now, and forget listed names that are gone: called by the run holding the
    folder after the libraries wrote into it, so that a file one of them added under a name not listed
    beforehand is known as the run's too (the claim refused anything else, and the lock keeps other runs out)."""
    folder = Path(output_dir)
    present = {p.name for p in folder.iterdir() if p.name not in OWN_FILES}
    if present != listed(folder):
        write_atomically(folder / RUN_FILES, json.dumps({"files": sorted(present)}, indent=1))


def written_by_a_run(name: str, files: set[str]) -> bool:
    """Listed, or the pipeline's own, or the temporary name of a listed file written atomically."""
    return name in files or name in OWN_FILES or (name.endswith(".tmp") and name.removesuffix(".tmp") in files)
