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

from alpaca_sft.data.dataset import preview
from alpaca_sft.data.records import DataError
from alpaca_sft.models.tokenizer import TokenizerError
from alpaca_sft.run_folder.layout import PREVIEW_FILE, record
from alpaca_sft.train.prepare import PreparedRun, prepare_run
from alpaca_sft.train.run import Outcome, build_trainer, train
from alpaca_sft.train.settings import ScriptArguments, SettingsError, parse_settings


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> Outcome | None:
    """Train as the settings say; returns how the run ended (None for --preview)."""
    started, state = time.time(), PartialState()
    # settings checked, output_dir claimed, data built, a resume compared with its checkpoint: before weights load
    with prepare_run(script_args, training_args, model_args, state) as run:
        if script_args.preview:
            if state.is_main_process:
                write_preview(run)
            return None
        trainer = build_trainer(*run.settings, run.tokenizer, run.dataset, run.validation, run.seal())
        outcome = train(trainer, run, started)
    if state.is_main_process and outcome.completed:
        print(f"done: the adapter is in {outcome.output_dir} (run_summary.json says how the run went). Compare it "
              f"with the base:\n  python eval_compare.py --base {model_args.model_name_or_path} --tuned {outcome.output_dir}")
    elif state.is_main_process:
        print(("error: " if outcome.exit_code == 1 else "") + outcome.message, file=sys.stderr)
    return outcome


def write_preview(run: PreparedRun) -> None:
    path = Path(run.training_args.output_dir) / PREVIEW_FILE
    record(path.parent, path.name)  # the run's, in output_dir's record of what runs wrote there
    print(f"{preview(run.dataset, run.tokenizer, run.script_args.preview, path)}\nwrote {path}")


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
