"""One run in a folder at a time: train_sft.py's output_dir, and eval_compare.py's.

The lock is an advisory lock (flock) on FOLDER/.lock, held by the main process for the whole run: the kernel drops it
when that process ends, however it ends (kill -9 included), so a lock is never stale; the file keeps the last
holder's pid and start time, to name it when a second run is refused, or when a run takes a folder over from one
that is gone."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .layout import LOCK_FILE


class FolderInUse(RuntimeError):
    """Another live run holds the folder; the message names it and says what to do."""


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
            raise FolderInUse(
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

    def took_over_note(self) -> str | None:
        """A line for the console when the folder's last run did not end here cleanly, or None."""
        holder = self.took_over_from
        if not holder or holder.get("pid") == os.getpid():
            return None
        return f"output_dir {self.path.parent}: its last run ({_describe(holder)}) is gone; this run takes the folder over"


def _read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a process that left no record"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
