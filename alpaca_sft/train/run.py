"""A training run in three parts: the trainer exactly as train_sft.py (and the benchmarks) build it; the
training itself, whose outcome is decided once; and the finish (adapter gathered whole and checked,
samples, the run's record). Nothing here ends the process: train_sft.py turns the Outcome into an exit code."""

from __future__ import annotations

import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from peft.helpers import disable_input_dtype_casting
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import SFTTrainer, get_peft_config, get_quantization_config

from ..disk import room_left, write_failure
from ..kernels.attention import resolve_attention
from ..kernels.fp8_base import quantize_frozen_base
from ..kernels.fused_lora import fuse_lora
from ..kernels.liger import pin_liger_rope_to_triton
from ..models.loading import load_model, set_generation_ids
from ..models.sources import model_fingerprint
from ..run_folder.layout import (CONFIG_FILE, SUMMARY_FILE, TRAINER_STATE, checkpoint_name, newest_sealed, record,
                                 record_present)
from .callbacks import EvaluateAtEnd, GracefulStop, NonFiniteGuard, ProgressLine, ThroughputRecord
from .prepare import PreparedRun
from .run_record import peak_gpu_memory_per_process, run_summary, save_resolved_config, write_json
from .validation import ValidatingSFTTrainer, samples_at_end, samples_text


# The finished adapter is written here whole, checked, then moved into output_dir (save_adapter).
STAGING = ".adapter.saving"


class IncompleteAdapterError(RuntimeError):
    """The adapter on disk is not what was trained: a tensor missing, cut to one process's shard, or different."""


class AdapterWriteError(RuntimeError):
    """The adapter could not be written: the disk is full, or refuses writes."""


class RunTrainer(ValidatingSFTTrainer):
    """The run's trainer: each checkpoint-N is listed in output_dir's record of the run's files (run_folder/layout.py)
    before a byte of it is written, and so is the model card TRL's SFTTrainer writes into output_dir with every
    checkpoint. transformers' _save_checkpoint writes every checkpoint, whatever asked for it (a step, an epoch, a
    best metric, a stop), and SFTTrainer's override of it writes the card."""

    def _save_checkpoint(self, model, trial):
        if self.is_world_process_zero():
            record(self.args.output_dir, checkpoint_name(self.state.global_step), "README.md")
        super()._save_checkpoint(model, trial)


@dataclass
class Outcome:
    """How a run ended: `status` as run_summary.json records it, what to tell the user, the exit code."""

    status: str  # "completed", "stopped: SIGTERM at step 3", "stopped: non-finite ...", "failed: ..."
    message: str
    exit_code: int
    output_dir: Path
    trainer: SFTTrainer | None = None

    @property
    def completed(self) -> bool:
        return self.status == "completed"


def lora_config(model_args):
    """TRL's LoRA config from the settings. TRL's ModelConfig turns a one-name lora_target_modules list into the
    name itself, which PEFT reads as a pattern for a whole module name, so `[q_proj]` would match no layer; a bare
    name goes back to the list it was given as (a pattern, all-linear and longer lists pass as they are)."""
    config = get_peft_config(model_args)
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"\w+", targets):
        config.target_modules = {targets}
    return config


def build_trainer(script_args, training_args, model_args, tokenizer, dataset, eval_dataset=None, seal=None) -> SFTTrainer:
    """The model and SFTTrainer as train_sft.py trains them, its console line, stops and validation included;
    `seal` (train/checkpoints.py's CheckpointSeal) marks each checkpoint complete once it is."""
    attn_implementation = resolve_attention(model_args.attn_implementation, training_args.packing)
    if training_args.use_liger_kernel:
        pin_liger_rope_to_triton()
    model = load_model(model_args.model_name_or_path, model_args.dtype, revision=model_args.model_revision,
                       attn_implementation=attn_implementation, quantization_config=get_quantization_config(model_args))
    model.config.use_cache = False  # training: the KV cache is dead weight, and packed rows need none
    set_generation_ids(model, tokenizer)
    callbacks = [ThroughputRecord(), ProgressLine(), GracefulStop(), NonFiniteGuard()] + ([seal] if seal else [])
    trainer = RunTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
        callbacks=callbacks + ([EvaluateAtEnd()] if eval_dataset is not None else []),
    )
    for printer in (ProgressCallback, PrinterCallback):  # ProgressLine is the console's one line per log
        trainer.remove_callback(printer)
    if model_args.use_peft and script_args.fused_lora:
        fuse_lora(trainer.model)
    if script_args.fp8_base:  # after the Trainer placed the model: each bf16 weight is freed as it is quantized
        converted = quantize_frozen_base(trainer.model, script_args.fp8_layers, script_args.fp8_input_grad)
        adapted = sum(isinstance(m, LoraLayer) for m in trainer.model.modules())
        chosen = f"fp8_layers: {' '.join(script_args.fp8_layers)}" if script_args.fp8_layers else "every adapted layer"
        left = "" if converted == adapted else "; the others stay bf16: not chosen, or sizes not multiples of 16"
        if trainer.accelerator.is_main_process:
            print(f"fp8_base: {converted} of the {adapted} adapted linear layers in FP8 ({chosen}{left}), input "
                  f"gradients in {script_args.fp8_input_grad}")
    return trainer


def _callback(trainer, kind):
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, kind))


def train(trainer, run: PreparedRun, started: float) -> Outcome:
    """Train, decide how it ended, save the adapter of a finished run, answer a few validation prompts if
    the settings ask, and write the run's record."""
    script_args, _, model_args = run.settings
    args = trainer.args
    output_dir = Path(args.output_dir)
    main = trainer.accelerator.is_main_process
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        # transformers' TensorBoardCallback logs to output_dir/runs/ (unless TENSORBOARD_LOGGING_DIR says elsewhere)
        tensorboard = ["runs"] if "tensorboard" in (args.report_to or []) else []
        record(output_dir, CONFIG_FILE, TRAINER_STATE, SUMMARY_FILE, *tensorboard)
        save_resolved_config(output_dir / CONFIG_FILE, script_args, args, model_args)
    broken = _train(trainer, output_dir)
    if broken is not None:  # the Trainer's state is mid-step or mid-save: nothing more is written from it
        return broken

    outcome = _how_it_ended(trainer, output_dir)
    if outcome.completed:
        try:
            save_adapter(trainer.accelerator.unwrap_model(trainer.model), output_dir, trainer.processing_class, main)
        except IncompleteAdapterError as err:
            outcome = Outcome(f"failed: {err}", f"{err}\nNothing of it was kept; the checkpoints in {output_dir} hold the "
                              "training state: resume from the last one.", 1, output_dir)
        except AdapterWriteError as err:
            outcome = _interrupted(output_dir, str(err), 1)
    samples = None
    if outcome.completed and script_args.samples_at_end and run.validation is not None:
        samples = samples_at_end(trainer, run.validation, script_args.samples_at_end, script_args.sample_max_new_tokens)
        if samples:
            print(samples_text(samples), flush=True)
    outcome = _write_record(trainer, model_args, run.report, started, outcome,
                            samples_at_end=samples, resumed_with_changes=run.resumed_with_changes or None)
    trainer.accelerator.wait_for_everyone()
    outcome.trainer = trainer
    return outcome


def _train(trainer, output_dir: Path) -> Outcome | None:
    """trainer.train(); None when it returned, else the Outcome of a second Ctrl-C or a failed write."""
    args = trainer.args
    # PEFT keeps LoRA weights in fp32 and upcasts each adapted layer's bf16 input to match; under
    # bf16 autocast the matmul then runs in bf16 anyway, so the upcast only adds an fp32 copy and a
    # bf16 re-cast, saved for backward, of every adapted input. Same gradients, less memory traffic.
    try:
        with disable_input_dtype_casting(trainer.model, active=args.bf16 or args.fp16):
            trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        return None
    except KeyboardInterrupt:  # a second Ctrl-C, during the save the first one asked for
        broken = _interrupted(output_dir, "interrupted again while saving", 128 + signal.SIGINT)
    except Exception as err:  # a full disk, said in whichever way the library writing met it (alpaca_sft/disk.py)
        if not (failure := write_failure(err)):
            raise
        _, unsealed = newest_sealed(output_dir)
        written = getattr(err, "filename", None) or (unsealed[-1] if unsealed else output_dir)
        broken = _interrupted(output_dir, f"{failure} while writing {written} ({room_left(written)})", 1)
    broken.trainer = trainer
    return broken


def _write_record(trainer, model_args, data_report, started: float, outcome: Outcome, **facts) -> Outcome:
    """trainer_state.json (the whole log history, every logged loss with its step) and run_summary.json; a disk that
    cannot take them fails the run in one message."""
    output_dir, main = outcome.output_dir, trainer.accelerator.is_main_process
    failure = None
    try:
        trainer.save_state()
    except Exception as err:
        if not (failure := write_failure(err)):
            raise
    peaks = peak_gpu_memory_per_process()  # a collective: every process takes part
    if main and failure is None:
        summary = run_summary(
            trainer, data_report, started, outcome.status,
            peak_gpu_memory_gib=max(peaks) if peaks else None, peak_gpu_memory_gib_per_process=peaks,
            attn_implementation=trainer.model.config._attn_implementation,
            base_model=model_args.model_name_or_path,
            base_fingerprint=model_fingerprint(model_args.model_name_or_path, model_args.model_revision),
            **facts,
        )
        try:
            write_json(output_dir / SUMMARY_FILE, summary)
            record_present(output_dir)
        except OSError as err:
            if not (failure := write_failure(err)):
                raise
    if failure is None:
        return outcome
    said = outcome.message or f"the adapter in {output_dir} is complete and checked"
    return Outcome(f"failed: {failure} while writing the run's record", f"{said}\n{failure} while writing the run's "
                   f"record ({TRAINER_STATE}, {SUMMARY_FILE}) in {output_dir} ({room_left(output_dir)}): it is not "
                   "complete.", 1, output_dir)


def _interrupted(output_dir: Path, what: str, exit_code: int) -> Outcome:
    last_good, unsealed = newest_sealed(output_dir)
    skipped = f"; {', '.join(p.name for p in unsealed)} was not completely written and will be skipped" if unsealed else ""
    resume = ("resume with --resume_from_checkpoint true" + (" once there is room on the disk" if exit_code == 1 else "")
              if last_good else "start again")
    return Outcome(f"{'failed' if exit_code == 1 else 'stopped'}: {what}",
                   f"{what}. The last complete checkpoint is {last_good or 'none'}{skipped}: {resume}.",
                   exit_code, output_dir)


def _how_it_ended(trainer, output_dir: Path) -> Outcome:
    stop, guard = _callback(trainer, GracefulStop), _callback(trainer, NonFiniteGuard)
    last_good, _ = newest_sealed(output_dir)
    if guard.tripped_at is not None:
        return Outcome(
            f"stopped: non-finite loss or weights at step {guard.tripped_at}",
            f"the loss or a trainable weight became NaN/inf at step {guard.tripped_at}; nothing was saved after it. "
            f"Last good checkpoint: {last_good or 'none'}. Lower the learning rate or check the data, then resume "
            "from that checkpoint (--resume_from_checkpoint <path>) or start again.", 1, output_dir)
    if stop.stopped_at is not None:
        name = signal.Signals(stop.received).name
        return Outcome(f"stopped: {name} at step {stop.stopped_at}",
                       f"stopped by {name} at step {stop.stopped_at}; checkpoint saved to {last_good}. Run the same "
                       "command with --resume_from_checkpoint true to continue from there.", 128 + stop.received, output_dir)
    return Outcome("completed", "", 0, output_dir)


def save_adapter(model, output_dir: Path, tokenizer, is_main_process: bool) -> None:
    """Write the trained adapter whole, whatever launched the run, and prove it by reading it back.

    Under DDP every process holds the whole adapter, but under FSDP each holds a slice of every LoRA
    tensor, and transformers' Trainer.save_model writes nothing at all with FSDP's sharded state
    dict. torch's get_model_state_dict gathers the trainable tensors at full shape onto the main
    process (a collective: every process must call this), and PEFT writes them in its own format.
    Raises IncompleteAdapterError or AdapterWriteError on every process, so that all take the same way on.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trained = get_model_state_dict(model, options=options)
    problem = _write_adapter(model, Path(output_dir), tokenizer, trained) if is_main_process else None
    if dist.is_available() and dist.is_initialized():
        said = [problem]
        dist.broadcast_object_list(said, src=0)
        problem = said[0]
    if problem is not None:
        raise problem


def _write_adapter(model, output_dir: Path, tokenizer, trained: dict) -> Exception | None:
    """The adapter, tokenizer and generation config written into output_dir/STAGING and checked there, then moved into
    output_dir file by file, adapter_config.json (what makes a folder an adapter to PEFT) last: a save cut short
    leaves nothing that looks like an adapter. Returns what went wrong, having removed what it wrote."""
    staging = output_dir / STAGING
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        record(output_dir, STAGING)
        shutil.rmtree(staging, ignore_errors=True)  # what a killed save left
        staging.mkdir()
        if (output_dir / "README.md").is_file():  # TRL's card, written with the checkpoints: PEFT updates it
            shutil.copy2(output_dir / "README.md", staging / "README.md")
        model.save_pretrained(staging, state_dict=trained)
        tokenizer.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        check_adapter(staging, model, trained)
        names = sorted((p.name for p in staging.iterdir()), key=lambda name: name == "adapter_config.json")
        record(output_dir, *names)
    except Exception as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, IncompleteAdapterError):
            return err
        if failure := write_failure(err):
            return AdapterWriteError(f"{failure} while saving the adapter to {output_dir} ({room_left(output_dir)}); "
                                     "nothing of it was kept")
        raise
    for name in names:
        os.replace(staging / name, output_dir / name)
    staging.rmdir()
    return None


def check_adapter(output_dir: Path, model, trained: dict[str, torch.Tensor]) -> None:
    """The adapter file holds every trainable tensor of `model`, each at its full (unsharded)
    shape and equal to `trained`; otherwise IncompleteAdapterError names what is wrong."""
    from peft import get_peft_model_state_dict

    # PEFT's own key mapping, applied to the full shapes (a DTensor's .shape is the global one).
    shapes = {name: torch.empty(p.shape, device="meta") for name, p in model.named_parameters() if p.requires_grad}
    expected = get_peft_model_state_dict(model, state_dict=shapes)
    values = get_peft_model_state_dict(model, state_dict=trained)
    path = Path(output_dir) / "adapter_model.safetensors"
    saved = load_file(path) if path.is_file() else {}
    problems = [f"{key}: missing" for key in expected if key not in saved]
    problems += [f"{key}: not a trained tensor" for key in saved if key not in expected]
    for key, shape in ((k, tuple(v.shape)) for k, v in expected.items() if k in saved):
        if tuple(saved[key].shape) != shape:
            problems.append(f"{key}: shape {list(saved[key].shape)}, the trained tensor is {list(shape)}")
        elif not torch.equal(saved[key], values[key].to(saved[key].dtype)):
            problems.append(f"{key}: differs from the trained tensor")
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:10]) + (f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise IncompleteAdapterError(f"the adapter saved to {path} is not what was trained:\n{shown}")
