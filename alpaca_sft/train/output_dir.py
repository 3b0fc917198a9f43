"""A run's folder claimed for this run: one run in it at a time (run_folder/lock.py), nothing written over or
removed that no run wrote, and a clean start when the user asks to replace the run in it.

Every file and folder a run creates in output_dir is listed in its record of the run's files (run_folder/layout.py)
before it is written, atomically, so a run killed mid-write leaves it listed. A run refuses a folder that holds
anything the record does not list, a model folder included, so it never writes over what it did not create, and
--overwrite_output_dir removes what the record lists and nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..run_folder.layout import OWN_FILES, RUN_FILES, listed, record, record_present, written_by_a_run
from ..run_folder.lock import FolderInUse, OutputDirLock
from .checkpoints import set_aside_plan
from .settings import SettingsError

# What makes a folder a model (transformers' file names); a run of a full fine-tune writes them too, listed.
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
NAMES_SHOWN = 10


def not_listed(output_dir: str | Path) -> list[str]:
    """What output_dir holds that no run recorded as written; a folder's name ends in /."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    files = listed(folder)
    others = [p.name for p in folder.iterdir() if not written_by_a_run(p.name, files)]
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


def start_clean(output_dir: str | Path) -> list[str]:
    """Remove what earlier runs wrote in output_dir, as their record lists it (adapter, record, checkpoints, logs), so
    that nothing of them can be resumed into or mistaken for this run's; returns what was removed."""
    folder, files = Path(output_dir), listed(output_dir)
    removed = sorted(p.name for p in folder.iterdir() if p.name not in OWN_FILES and written_by_a_run(p.name, files))
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
            notes = [lock.took_over_note()]
            resume = training_args.resume_from_checkpoint
            if script_args.overwrite_output_dir and not resume and not script_args.preview:
                removed = start_clean(training_args.output_dir)
                notes.append(f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)}" if removed else None)
            moved = _set_aside_newer(training_args.output_dir, resume)
            notes.append(f"resuming from {resume}; set aside: {', '.join(moved)} (.incomplete: not completely written; "
                         ".superseded: steps this run redoes)" if moved else None)
            said = [None, [n for n in notes if n]]
        except FolderInUse as err:
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
