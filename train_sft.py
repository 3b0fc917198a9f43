"""Instruction-tune a base causal LM (Mistral-7B) on Alpaca with LoRA or QLoRA through TRL's SFTTrainer.

    accelerate launch train_sft.py --config recipes/mistral-7b-lora.yaml
    accelerate launch train_sft.py --config recipes/mistral-7b-qlora.yaml --learning_rate 1e-4
    python train_sft.py --config recipes/tiny-cpu.yaml --preview 3      # see the supervised tokens
    accelerate launch train_sft.py --config <same recipe> --resume_from_checkpoint true

YAML recipes set every knob; any flag on the command line overrides the recipe. Ctrl-C or SIGTERM
saves a resumable checkpoint; the finished adapter, tokenizer, resolved config and
run_summary.json land in output_dir.
"""

import sys
import time
from pathlib import Path

from alpaca_sft.quiet import quiet_libraries

quiet_libraries()  # before the libraries load

from accelerate import PartialState
from trl import ModelConfig, SFTConfig

from alpaca_sft.data.dataset import build_training_data, preview
from alpaca_sft.data.records import DataError
from alpaca_sft.models.tokenizer import TokenizerError, load_tokenizer
from alpaca_sft.train.checkpoints import CheckpointSeal, check_resume, run_shape
from alpaca_sft.train.checks import apply_pipeline_settings, check_settings
from alpaca_sft.run_folder.layout import record
from alpaca_sft.train.output_dir import claim
from alpaca_sft.train.run import Outcome, build_trainer, train
from alpaca_sft.train.settings import ScriptArguments, SettingsError, parse_settings


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> Outcome | None:
    """Train as the settings say; returns how the run ended (None for --preview)."""
    started, state = time.time(), PartialState()
    for warning in check_settings(script_args, training_args, model_args):  # everything that can fail before weights load
        if state.is_main_process:
            print(f"warning: {warning}", file=sys.stderr)
    apply_pipeline_settings(script_args, training_args)
    lock = claim(script_args, training_args, state.is_main_process)  # this run's folder: locked, clean or resumable
    try:
        return run(script_args, training_args, model_args, state, started)
    finally:
        if lock is not None:
            lock.release()


def run(script_args, training_args, model_args, state, started: float) -> Outcome | None:
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision)
    with state.main_process_first():  # a Hub dataset is downloaded once
        dataset, validation, report = build_training_data(script_args, tokenizer, training_args.max_length,
                                                          training_args.seed)
    if state.is_main_process:
        print(report.summary())
    if script_args.preview:
        if state.is_main_process:
            path = Path(training_args.output_dir) / "preview.jsonl"
            record(path.parent, path.name)  # the run's, in output_dir's record of what runs wrote there
            print(f"{preview(dataset, tokenizer, script_args.preview, path)}\nwrote {path}")
        return None

    shape = run_shape(script_args, training_args, model_args, state.num_processes, report.fingerprint,
                      report.validation_fingerprint)
    changes = None
    if training_args.resume_from_checkpoint:
        changes = check_resume(training_args.resume_from_checkpoint, shape, script_args.allow_changed_settings)
    trainer = build_trainer(script_args, training_args, model_args, tokenizer, dataset, validation, CheckpointSeal(shape))
    outcome = train(trainer, script_args, model_args, report, started, validation, changes)
    if state.is_main_process and outcome.completed:
        print(f"done: the adapter is in {outcome.output_dir} (run_summary.json says how the run went). Compare it "
              f"with the base:\n  python eval_compare.py --base {model_args.model_name_or_path} --tuned {outcome.output_dir}")
    elif state.is_main_process:
        print(("error: " if outcome.exit_code == 1 else "") + outcome.message, file=sys.stderr)
    return outcome


def cli(argv: list[str] | None = None) -> int:
    """The command line: the run's exit code; a bad setting, file or tokenizer said in one message."""
    try:
        outcome = main(*parse_settings(argv))
    except (SettingsError, DataError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return outcome.exit_code if outcome else 0


if __name__ == "__main__":
    sys.exit(cli())
