"""A run's folder: one run in it at a time, and a clean start when the user asks to replace the run in it.

The lock is an advisory lock (flock) on output_dir/.lock, held by the main process for the whole run: the
kernel drops it when that process ends, however it ends (kill -9 included), so a lock is never stale; the
file keeps the last holder's pid and start time, to name it when a second run is refused, or when a run
takes a folder over from one that is gone."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from .checkpoints import set_aside_newer
from .settings import SettingsError

LOCK_FILE = ".lock"
# What a run writes into output_dir (transformers', PEFT's and this project's files): what a clean start
# removes. Anything else in the folder is the user's and stays.
RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md", "train_config.yaml", "run_summary.json",
             "trainer_state.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
             "chat_template.jinja", "generation_config.json", "preview.jsonl", "training_args.bin")
RUN_GLOBS = ("checkpoint-*", "runs")


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
    """Remove what an earlier run left in output_dir (its adapter, record, checkpoints, logs), so that nothing of
    it can be resumed into or mistaken for this run's; returns what was removed. Other files are left alone."""
    folder, removed = Path(output_dir), []
    if not folder.is_dir():
        return removed
    for path in sorted([folder / name for name in RUN_FILES] + [p for g in RUN_GLOBS for p in folder.glob(g)]):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path.name)
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
            moved = set_aside_newer(training_args.output_dir, resume)
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
