"""Instruction-tune a base causal LM (Mistral-7B) on Alpaca with LoRA or QLoRA through TRL's SFTTrainer.

    accelerate launch train_sft.py --config recipes/mistral-7b-lora.yaml
    accelerate launch train_sft.py --config recipes/mistral-7b-qlora.yaml --learning_rate 1e-4
    python train_sft.py --config recipes/tiny-cpu.yaml --preview 3      # see the supervised tokens

YAML recipes set every knob; any flag on the command line overrides the recipe.
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from alpaca_sft.arguments import ScriptArguments, SettingsError, check_settings
from alpaca_sft.data import DataError, build_dataset, preview
from alpaca_sft.modeling import load_model, load_tokenizer


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> None:
    state = PartialState()
    check_settings(script_args, training_args, model_args)

    ################
    # Data: validated and tokenized before any weights load
    ################
    tokenizer = load_tokenizer(model_args)
    with state.main_process_first():
        dataset, report = build_dataset(
            script_args.dataset_name,
            tokenizer,
            split=script_args.dataset_split,
            max_length=training_args.max_length,
            drop_invalid_rows=script_args.drop_invalid_rows,
            overlong_policy=script_args.overlong_policy,
            max_rows=script_args.max_train_rows,
        )
    if state.is_main_process:
        print(report.summary())

    if script_args.preview:
        if state.is_main_process:
            path = Path(training_args.output_dir) / "preview.jsonl"
            print(preview(dataset, tokenizer, script_args.preview, path))
            print(f"wrote {path}")
        return

    ################
    # Model and training
    ################
    model = load_model(model_args, tokenizer)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    if state.is_main_process:
        (Path(training_args.output_dir) / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    try:
        main(*parser.parse_args_and_config())
    except (SettingsError, DataError) as err:
        sys.exit(f"error: {err}")
