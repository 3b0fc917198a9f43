"""A run's folder: one run in it at a time, a record of what runs wrote in it, and a clean start when the user
asks to replace the run in it.

The lock is an advisory lock (flock) on output_dir/.lock, held by the main process for the whole run: the
kernel drops it when that process ends, however it ends (kill -9 included), so a lock is never stale; the
file keeps the last holder's pid and start time, to name it when a second run is refused, or when a run
takes a folder over from one that is gone.

The record, output_dir/.run_files.json, lists every file and folder a run created there (checkpoints, the
adapter, the tokenizer, the model card transformers and PEFT write, tensorboard's runs/ ...). A name is listed
before it is written, atomically, so a run killed mid-write leaves it listed. A run refuses a folder that holds
anything the record does not list, a model folder included, so it never writes over what it did not create, and
--overwrite_output_dir removes what the record lists and nothing else."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from .checkpoints import set_aside_plan, write_atomically
from .settings import SettingsError

LOCK_FILE = ".lock"
RUN_FILES = ".run_files.json"
# Written only by this module, under these names: the pipeline's own whatever the record says.
OWN_FILES = (LOCK_FILE, RUN_FILES, RUN_FILES + ".tmp")
# What makes a folder a model (transformers' file names); a run of a full fine-tune writes them too, listed.
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
NAMES_SHOWN = 10
# What a run wrote before runs kept a record (this project until 2026-12-06), by name: in a folder that holds such a
# run (its train_config.yaml or a sealed checkpoint) these are taken as its, so that it can still be resumed or
# replaced.
UNRECORDED_RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md", "train_config.yaml",
                        "run_summary.json", "trainer_state.json", "tokenizer.json", "tokenizer_config.json",
                        "tokenizer.model", "special_tokens_map.json", "chat_template.jinja", "generation_config.json",
                        "preview.jsonl", "training_args.bin", "runs")


def listed(output_dir: str | Path) -> set[str]:
    """The names runs recorded as written in output_dir (for a run from before the record, the names such runs
    wrote; none for a folder that holds no run)."""
    folder = Path(output_dir)
    try:
        return set(json.loads((folder / RUN_FILES).read_text())["files"])
    except FileNotFoundError:
        return _written_before_the_record(folder)


def _written_before_the_record(folder: Path) -> set[str]:
    if not ((folder / "train_config.yaml").is_file() or any(folder.glob("checkpoint-*/checkpoint.json"))):
        return set()
    return {p.name for p in folder.iterdir() if p.name in UNRECORDED_RUN_FILES or p.name.startswith("checkpoint-")}


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


def _written_by_a_run(name: str, files: set[str]) -> bool:
    """Listed, or the temporary name of a listed file written atomically (train/checkpoints.py's write_atomically)."""
    return name in files or name in OWN_FILES or (name.endswith(".tmp") and name.removesuffix(".tmp") in files)


def not_listed(output_dir: str | Path) -> list[str]:
    """What output_dir holds that no run recorded as written; a folder's name ends in /."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    files = listed(folder)
    others = [p.name for p in folder.iterdir() if not _written_by_a_run(p.name, files)]
    return sorted(name + "/" if (folder / name).is_dir() else name for name in others)


def folder_problem(output_dir: str | Path, base: str | None) -> str | None:
    """Why a run must not write into output_dir (a model folder; files no run wrote), or None."""
    folder, others = Path(output_dir), not_listed(output_dir)
    if not others:
        return None
    shown = ", ".join(others[:NAMES_SHOWN]) + (f" and {len(others) - NAMES_SHOWN} more" if len(others) > NAMES_SHOWN else "")
    model = [name for name in others if name in MODEL_FILES]
    if model:
        whose = " (the base model's own folder)" if base and Path(base).expanduser().resolve() == folder.resolve() else ""
        return (f"output_dir={folder} is a model folder{whose}: it holds {', '.join(model)}, which no run wrote. A run "
                "writes its adapter, tokenizer and model card in output_dir, and --overwrite_output_dir removes only what "
                "a run wrote there: give another --output_dir (a new or empty folder)")
    return (f"output_dir={folder} holds {shown}, which no run of train_sft.py wrote (a run lists what it writes in "
            f"{RUN_FILES}). A run never writes over or removes anything else, --overwrite_output_dir included: give "
            "another --output_dir (a new or empty folder), or move those out of this one")


class OutputDirLock:
    """Held from acquire() until the process ends (or release())."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.handle = None
        self.took_over_from: dict | None = None

    def acquire(self) -> OutputDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(self.path)
            handle.close()
            raise SettingsError(
                f"output_dir={self.path.parent} is in use by another run ({_describe(holder)}): wait for it to end, "
                "or give another --output_dir") from None
        self.took_over_from = _read_holder(self.path)  # a run that ended, or died, without a word
        handle.seek(0), handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def _read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a process that left no record"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def took_over_note(lock: OutputDirLock) -> str | None:
    """A line for the console when the folder's last run did not end here cleanly, or None."""
    holder = lock.took_over_from
    if not holder or holder.get("pid") == os.getpid():
        return None
    return f"output_dir {lock.path.parent}: its last run ({_describe(holder)}) is gone; this run takes the folder over"


def start_clean(output_dir: str | Path) -> list[str]:
    """Remove what earlier runs wrote in output_dir, as their record lists it (adapter, record, checkpoints, logs), so
    that nothing of them can be resumed into or mistaken for this run's; returns what was removed."""
    folder, files = Path(output_dir), listed(output_dir)
    removed = sorted(p.name for p in folder.iterdir() if p.name not in OWN_FILES and _written_by_a_run(p.name, files))
    for path in (folder / name for name in removed):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    record_present(folder)
    return removed


def claim(script_args, training_args, is_main_process: bool) -> OutputDirLock | None:
    """Before anything is written: take output_dir for this run (the main process holds the lock), start it clean
    if --overwrite_output_dir asks to replace the run in it, and set aside the checkpoints newer than the one
    resumed (train/checkpoints.py). Every process raises the same SettingsError if the folder is another live run's."""
    from accelerate.utils import broadcast_object_list

    lock, said = None, [None, []]
    if is_main_process:
        try:
            lock = OutputDirLock(training_args.output_dir).acquire()
            notes = [took_over_note(lock)]
            resume = training_args.resume_from_checkpoint
            if script_args.overwrite_output_dir and not resume and not script_args.preview:
                removed = start_clean(training_args.output_dir)
                notes.append(f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)}" if removed else None)
            moved = _set_aside_newer(training_args.output_dir, resume)
            notes.append(f"resuming from {resume}; set aside: {', '.join(moved)} (.incomplete: not completely written; "
                         ".superseded: steps this run redoes)" if moved else None)
            said = [None, [n for n in notes if n]]
        except SettingsError as err:
            said = [str(err), []]
    problem, notes = broadcast_object_list(said)
    if problem:
        raise SettingsError(problem)
    for note in notes if is_main_process else []:
        print(note, flush=True)
    return lock


def _set_aside_newer(output_dir, resume: str | None) -> list[str]:
    """train/checkpoints.py's set_aside_plan carried out, each new name listed before the rename."""
    moves = set_aside_plan(output_dir, resume)
    record(output_dir, *(target.name for _, target in moves))
    for source, target in moves:
        source.rename(target)
    return [target.name for _, target in moves]
