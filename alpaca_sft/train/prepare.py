"""A run prepared once, before any weights load: its settings checked and settled, its folder claimed, its tokenizer
and data built, and a resume compared with the checkpoint it continues. train_sft.py starts every run here, and so
do the benchmarks that measure train_sft.py's trainer, so that they measure what it trains."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from accelerate import PartialState

from ..data.dataset import DataReport, build_training_data
from ..models.tokenizer import load_tokenizer
from ..run_folder.lock import OutputDirLock
from .checkpoints import CheckpointSeal, check_resume, run_shape
from .checks import apply_pipeline_settings, check_settings
from .output_dir import claim

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase
    from trl import ModelConfig, SFTConfig

    from .settings import ScriptArguments


@dataclass
class PreparedRun:
    """What a run needs once it loads its model: `with prepare_run(...) as run:` holds its folder until the end."""

    script_args: ScriptArguments
    training_args: SFTConfig
    model_args: ModelConfig
    tokenizer: PreTrainedTokenizerBase
    dataset: Dataset  # the training examples
    validation: Dataset | None  # the validation examples, or None (validation off)
    report: DataReport
    lock: OutputDirLock | None  # held by the main process
    shape: dict | None = None  # what makes this run this run (train/checkpoints.py); None for --preview
    resumed_with_changes: list[str] = field(default_factory=list)  # what --allow_changed_settings let a resume change

    @property
    def settings(self) -> tuple[ScriptArguments, SFTConfig, ModelConfig]:
        """The three settings objects, in the order build_trainer and the checks take them."""
        return self.script_args, self.training_args, self.model_args

    def seal(self) -> CheckpointSeal:
        """The callback that seals each of this run's checkpoints with its shape."""
        return CheckpointSeal(self.shape)

    def release(self) -> None:
        """Give output_dir back (the lock), once the run is done with it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> PreparedRun:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def prepare_run(script_args, training_args, model_args, state: PartialState | None = None) -> PreparedRun:
    """Check every setting (one SettingsError; the warnings printed), fill in the pipeline's defaults, resolve the
    resume, claim output_dir, build the tokenizer and data (DataError, TokenizerError) and print the data report; then,
    unless previewing, compare a resume with its checkpoint (a SettingsError unless allow_changed_settings)."""
    state = state or PartialState()
    checked = check_settings(script_args, training_args, model_args)  # everything that can fail before weights load
    for warning in checked.warnings if state.is_main_process else []:
        print(f"warning: {warning}", file=sys.stderr)
    apply_pipeline_settings(script_args, training_args)
    training_args.resume_from_checkpoint = checked.resume_from  # "true" named the newest sealed checkpoint
    lock = claim(script_args, training_args, state.is_main_process)  # this run's folder: locked, clean or resumable
    try:
        run = _with_data(script_args, training_args, model_args, state, lock)
        if not script_args.preview:
            run.shape = run_shape(script_args, training_args, model_args, state.num_processes, run.report.fingerprint,
                                  run.report.validation_fingerprint)
            if checked.resume_from:
                run.resumed_with_changes = check_resume(checked.resume_from, run.shape, script_args.allow_changed_settings)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return run


def _with_data(script_args, training_args, model_args, state: PartialState, lock) -> PreparedRun:
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision)
    with state.main_process_first():  # a Hub dataset is downloaded once
        dataset, validation, report = build_training_data(script_args, tokenizer, training_args.max_length,
                                                          training_args.seed)
    if state.is_main_process:
        print(report.summary())
    return PreparedRun(script_args, training_args, model_args, tokenizer, dataset, validation, report, lock)
