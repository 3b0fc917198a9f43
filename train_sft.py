"""Instruction-tune a base causal LM (Mistral-7B) on Alpaca with LoRA or QLoRA through TRL's SFTTrainer.

    accelerate launch train_sft.py --config recipes/mistral-7b-lora.yaml
    accelerate launch train_sft.py --config recipes/mistral-7b-qlora.yaml --learning_rate 1e-4
    python train_sft.py --config recipes/tiny-cpu.yaml --preview 3      # see the supervised tokens
    accelerate launch train_sft.py --config <same recipe> --resume_from_checkpoint true

YAML recipes set every knob; any flag on the command line overrides the recipe. Ctrl-C or SIGTERM
saves a resumable checkpoint; the finished adapter, tokenizer, resolved config and
run_summary.json land in output_dir.
"""

import os
import signal
import sys
import time
from pathlib import Path

from accelerate import PartialState
from peft.helpers import disable_input_dtype_casting
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from alpaca_sft.arguments import ScriptArguments, SettingsError, check_settings
from alpaca_sft.attention import resolve_attention
from alpaca_sft.callbacks import GracefulStopCallback, NonFiniteGuardCallback, ProgressCallback
from alpaca_sft.data import DataError, build_dataset, preview
from alpaca_sft.modeling import load_model, load_tokenizer
from alpaca_sft.outputs import (IncompleteAdapterError, peak_gpu_memory_per_process, run_summary, save_adapter,
                                save_resolved_config, write_json)


class TrainingStopped(RuntimeError):
    """The run stopped before its end; the message says what is on disk and what to do."""


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> SFTTrainer | None:
    started = time.time()
    state = PartialState()
    check_settings(script_args, training_args, model_args)
    if int(os.environ.get("WORLD_SIZE", 1)) > state.num_processes:
        raise SettingsError(
            f"{os.environ['WORLD_SIZE']} processes were launched but not joined into one group, so each "
            "would train alone; on a machine without a GPU add --use_cpu true"
        )
    if training_args.hub_token:  # keep it out of every saved config and log
        os.environ["HF_TOKEN"], training_args.hub_token = training_args.hub_token, None
    if training_args.gradient_checkpointing and not training_args.gradient_checkpointing_kwargs:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}  # DDP-safe with frozen weights
    training_args.logging_nan_inf_filter = False  # a NaN loss must show, not be averaged away
    if training_args.torch_compile:
        # Compile one decoder layer and reuse it for all 32 (accelerate's regional compilation), for
        # packed batches whose length changes every step (dynamic shapes): ~1 min, not ~32 or one per step.
        os.environ.setdefault("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "true")
        os.environ.setdefault("ACCELERATE_DYNAMO_USE_DYNAMIC", "true")
    output_dir = Path(training_args.output_dir)

    ################
    # Data: validated and tokenized before any weights load
    ################
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision)
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
            print(preview(dataset, tokenizer, script_args.preview, output_dir / "preview.jsonl"))
            print(f"wrote {output_dir / 'preview.jsonl'}")
        return None

    ################
    # Model
    ################
    attn_implementation = resolve_attention(model_args.attn_implementation, training_args.packing)
    model = load_model(model_args, tokenizer, attn_implementation)

    ################
    # Training
    ################
    progress, stop, guard = ProgressCallback(), GracefulStopCallback(), NonFiniteGuardCallback()
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[progress, stop, guard],
    )
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(output_dir / "train_config.yaml", script_args, training_args, model_args)
    # PEFT keeps LoRA weights in fp32 and upcasts each adapted layer's bf16 input to match; under
    # bf16 autocast the matmul then runs in bf16 anyway, so the upcast only adds an fp32 copy and a
    # bf16 re-cast, saved for backward, of every adapted input. Same gradients, less memory traffic.
    autocast = training_args.bf16 or training_args.fp16
    with disable_input_dtype_casting(trainer.model, active=autocast):
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    status, save_error = None, None
    if guard.tripped_at is not None:
        status = f"stopped: non-finite loss or weights at step {guard.tripped_at}"
    elif stop.stopped_at is not None:
        status = f"stopped: {signal.Signals(stop.received).name} at step {stop.stopped_at}"
    else:
        try:
            save_adapter(trainer.accelerator.unwrap_model(trainer.model), output_dir, tokenizer, state.is_main_process)
        except IncompleteAdapterError as err:
            status, save_error = f"failed: {err}", err
    trainer.save_state()  # trainer_state.json: the whole log history, every logged loss with its step
    peaks = peak_gpu_memory_per_process()
    if state.is_main_process:
        write_json(output_dir / "run_summary.json", run_summary(trainer, progress, report, started, attn_implementation, status, peaks))
    state.wait_for_everyone()
    if save_error is not None:
        raise TrainingStopped(f"{save_error}\nThe checkpoints in {output_dir} hold the training state; resume from the last one.")

    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    last_good = checkpoints[-1] if checkpoints else None
    if guard.tripped_at is not None:
        raise TrainingStopped(
            f"the loss or a trainable weight became NaN/inf at step {guard.tripped_at}; nothing was saved after "
            f"it. Last good checkpoint: {last_good or 'none'}. Lower the learning rate or check the data, then "
            "resume from that checkpoint (--resume_from_checkpoint <path>) or start again."
        )
    if stop.stopped_at is not None:
        print(
            f"{status}; checkpoint saved to {last_good}. "
            "Run the same command with --resume_from_checkpoint true to continue from there."
        )
        sys.exit(128 + stop.received)
    return trainer


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    try:
        main(*parser.parse_args_and_config())
    except (SettingsError, DataError, TrainingStopped) as err:
        sys.exit(f"error: {err}")
