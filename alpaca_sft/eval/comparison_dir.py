"""The comparison's folder (eval_compare.py's --output_dir): one run in it at a time, and nothing half-written
that looks whole.

- One run per folder: the lock of a run's folder (run_folder/lock.py: an flock on .lock, dropped by the kernel
  however the process ends).
- A run writes only under temporary names (`.tmp-*`) until it is done: the merged models into one staged
  tree, each sealed by merge.json, written last into it, and the reports. Then it publishes, in this
  order: the earlier comparison.json is removed, merged/ is replaced by the staged tree (or removed, when
  this run merged nothing), comparison.md is renamed into place, comparison.json last. comparison.json
  thus marks a folder whose files are all one complete run's: a kill at any point leaves either the earlier
  complete comparison or a folder without comparison.json.
- What a killed run left (`.tmp-*`; safetensors' own `.tmpXXXXXX` inside the staged tree) is removed when
  the next run takes the folder, before anything reads or uploads it.
- A full disk, a folder that cannot be written and Ctrl-C end in one message (ComparisonDirError) that
  says what the folder holds and what to run; this run's temporary files are removed first.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

from ..run_folder.layout import LOCK_FILE
from ..run_folder.lock import FolderInUse, OutputDirLock

TEMP_PREFIX = ".tmp"  # this module's `.tmp-*` and safetensors' `.tmpXXXXXX` alike
MERGED = "merged"
REPORTS = ("comparison.md", "comparison.json")  # in the order they are published: comparison.json, the mark, last
MARK = REPORTS[-1]
SEAL = "merge.json"  # in a merged model folder: written after every other file of it
# eval_compare.py --gguf's files, exported from merged/ after it is published (and removed with the merged model they
# came from when a later run replaces it), and what a stopped export left (release/gguf_export.py's partial files)
EXPORTS = ("*.gguf", "*.Modelfile")
PARTIAL_EXPORTS = ".*.partial-*"
STAGED = re.compile(rf"^\{TEMP_PREFIX}-\d+-(retired-)?{MERGED}$")
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


class ComparisonDirError(RuntimeError):
    """The comparison's folder cannot be used, or a write into it failed; the message says what to do."""


class Interrupted(ComparisonDirError):
    """Ctrl-C: the message says what the folder holds and what to run."""


def unfinished_merge(folder: Path) -> str | None:
    """Why a folder given as --tuned is a merged model (or a save) whose writing did not finish, or None."""
    folder = Path(folder)
    if STAGED.match(folder.resolve().name) or STAGED.match(folder.resolve().parent.name):
        return (f"--tuned {folder} is a merged model an eval_compare.py run had not finished writing (it was stopped); "
                "the next run into its folder removes it")
    if any(p.name.startswith(TEMP_PREFIX) for p in folder.iterdir()):
        return f"--tuned {folder} holds the temporary files of a save that was stopped: it is not completely written"
    holder = folder.parent if folder.name == MERGED else folder.parent.parent if folder.parent.name == MERGED else None
    if holder is not None and _is_comparison(holder) and not (folder / SEAL).is_file():
        return (f"--tuned {folder} was not completely written by eval_compare.py (it has no {SEAL}, which is written "
                "last): merge the adapter again with eval_compare.py --tuned <the adapter folder>")
    return None


def _is_comparison(folder: Path) -> bool:
    return any((folder / name).exists() for name in (*REPORTS, LOCK_FILE))


def _write_problem(err: BaseException) -> tuple[int, str] | None:
    """(errno, text) of a failed write: an OSError, or safetensors' SafetensorError, which carries the
    operating system's error only in its message ("... (os error 28)")."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRORS:
        return err.errno, err.strerror
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found and int(found.group(1)) in WRITE_ERRORS:
        return int(found.group(1)), os.strerror(int(found.group(1)))
    return None


class ComparisonDir:
    """`with ComparisonDir(path, rerun) as folder:` holds the folder for this run; stage_model() and seal()
    build the merged models under a temporary name, publish() makes the run's files the folder's."""

    def __init__(self, path: Path, rerun: str):
        self.path, self.rerun = Path(path), rerun
        self.lock = OutputDirLock(self.path)
        self.staged: Path | None = None
        self.removed: list[str] = []  # leftovers of a killed run, removed on entry
        self.published = False

    def __enter__(self) -> ComparisonDir:
        try:
            self.lock.acquire()
        except FolderInUse as err:
            raise ComparisonDirError(str(err)) from None
        except OSError as err:
            raise ComparisonDirError(f"cannot write to --output_dir {self.path}: {err.strerror}"
                                     f"{f' ({err.filename})' if err.filename else ''}. Give a folder you can write to") from None
        merged = self.path / MERGED
        if merged.exists() and not ((self.path / MARK).is_file() or _sealed(merged)):
            self.lock.release()
            raise ComparisonDirError(f"{merged} is not a merged model that eval_compare.py finished (no {SEAL}) and "
                                     "this run would replace it: move it away, or give another --output_dir")
        for leftover in sorted([*self.path.glob(f"{TEMP_PREFIX}*"), *self.path.glob(PARTIAL_EXPORTS)]):
            _remove(leftover)
            self.removed.append(leftover.name)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if error is not None:
                self.discard()
        finally:
            self.lock.release()
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(f"interrupted: {self._left()}. Run it again:\n  {self.rerun}") from None
        if error is not None and (problem := _write_problem(error)):
            full = problem[0] in (errno.ENOSPC, errno.EDQUOT)
            todo = "Free space on its disk" if full else "Make it writable, or give another --output_dir,"
            raise ComparisonDirError(f"{problem[1]}: {self._left()}. {todo} and run again:\n  {self.rerun}") from None

    def _left(self) -> str:
        if self.published:
            return (f"this run's comparison and merged model in {self.path} are complete; the GGUF file being written "
                    "was removed")
        holds = "its earlier comparison, as it was" if (self.path / MARK).is_file() else "no complete comparison"
        return f"nothing of this run was kept in {self.path}, which holds {holds}; this run's temporary files are removed"

    def stage_model(self, name: str | None) -> tuple[Path, Path]:
        """(where to save a merged model now, where it will be once published): merged/ itself for the one
        model of a run, merged/<name>/ for each of several."""
        if self.staged is None:
            self.staged = self.path / f"{TEMP_PREFIX}-{os.getpid()}-{MERGED}"
            self.staged.mkdir(parents=True)
        return (self.staged / name, self.path / MERGED / name) if name else (self.staged, self.path / MERGED)

    def _temporary(self, folder: Path, name: str, text: str) -> Path:
        """text written whole under a temporary name beside `name`, to be renamed into place."""
        path = folder / f"{TEMP_PREFIX}-{os.getpid()}-{name}"
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def seal(self, folder: Path, record: dict) -> None:
        """Marks a staged merged model complete: written after every other file of it."""
        self._temporary(folder, SEAL, json.dumps(record, indent=2)).rename(folder / SEAL)

    def publish(self, texts: dict[str, str]) -> None:
        """The run's reports and merged models become the folder's, comparison.json last."""
        staged = {name: self._temporary(self.path, name, texts[name]) for name in REPORTS}
        (self.path / MARK).unlink(missing_ok=True)  # until the last rename, the folder is marked incomplete
        merged = self.path / MERGED
        retired = merged.rename(self.path / f"{TEMP_PREFIX}-{os.getpid()}-retired-{MERGED}") if merged.exists() else None
        if self.staged is not None:
            self.staged.rename(merged)
            self.staged = None
        for name in REPORTS:
            staged[name].rename(self.path / name)
        if retired is not None:
            _remove(retired)
        for export in [path for pattern in EXPORTS for path in self.path.glob(pattern)]:
            export.unlink()  # made from the merged model just replaced
        self.published = True

    def discard(self) -> None:
        """This run's temporary files, removed."""
        for leftover in self.path.glob(f"{TEMP_PREFIX}-{os.getpid()}-*"):
            _remove(leftover)
        self.staged = None


def _sealed(merged: Path) -> bool:
    """merged/ holds one sealed model, or folders of sealed models."""
    if (merged / SEAL).is_file():
        return True
    folders = [p for p in merged.iterdir() if p.is_dir()] if merged.is_dir() else []
    return bool(folders) and all((p / SEAL).is_file() for p in folders)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
