"""Trainer callbacks: the throughput kept in the run's log history, one console line per log (and one
per evaluation), an evaluation after the last step, a stop on SIGTERM/Ctrl-C that keeps a resumable
checkpoint, and a stop on a non-finite loss before it can overwrite a good checkpoint."""

from __future__ import annotations

import math
import signal
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback


def _any_process(flag: bool) -> bool:
    """True if flag is set on any process, so that all processes stop at the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded (FSDP2 DTensor) tensor; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class ThroughputRecord(TrainerCallback):
    """Adds to each logged training entry of the run's log history `tokens_per_second` over the window since
    the last log and `train_seconds` since the run began, summed across interruptions: the log history is what
    a checkpoint keeps, so a resumed run's record (run_record.py) covers the whole run. Evaluation time is
    left out of the windows."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen
        self.earlier_seconds = next((h["train_seconds"] for h in reversed(state.log_history) if "train_seconds" in h), 0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = state.log_history[-1] if state.log_history else {}
        if not logs or "loss" not in logs or entry.get("step") != state.global_step:
            return
        now = time.perf_counter()
        entry["tokens_per_second"] = (state.num_input_tokens_seen - self.last_tokens) / max(now - self.last_time, 1e-9)
        entry["train_seconds"] = self.earlier_seconds + now - self.start
        self.last_time, self.last_tokens = now, state.num_input_tokens_seen

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if hasattr(self, "last_time"):  # during training (not a lone trainer.evaluate())
            self.last_time += (metrics or {}).get("eval_runtime", 0.0)


class ProgressLine(TrainerCallback):
    """The console's one line per logging step (step, loss, tokens/s, time left) and one per evaluation,
    replacing the Trainer's progress bar and dict printout. It only reads: ThroughputRecord, ahead of it,
    puts the window's tokens/s into the log entry."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = state.log_history[-1] if state.log_history else {}
        if not state.is_world_process_zero or "tokens_per_second" not in entry or entry.get("step") != state.global_step:
            return
        elapsed, done = time.perf_counter() - self.start, state.global_step - self.start_step
        left = elapsed / done * (state.max_steps - state.global_step) if done else 0.0
        print(f"step {state.global_step}/{state.max_steps} | loss {entry['loss']:.4f} | {entry['tokens_per_second']:,.0f} "
              f"tokens/s | elapsed {_duration(elapsed)} | left {_duration(left)}", flush=True)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        if state.is_world_process_zero and "eval_loss" in metrics:
            stop = (f" | EOS top-1 at response ends {metrics['eval_eos_top1']:.1%} | p(EOS) {metrics['eval_eos_prob']:.3f}"
                    if "eval_eos_top1" in metrics else "")
            print(f"eval at step {state.global_step} | validation loss {metrics['eval_loss']:.4f}{stop} | "
                  f"{metrics.get('eval_runtime', 0.0):.1f} s", flush=True)


class EvaluateAtEnd(TrainerCallback):
    """Evaluate after the last step too, whatever eval_strategy says (transformers 5.24 does it only
    for eval_strategy "steps"), so that every finished run with validation data ends with its
    validation loss and stop metric."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True


def stop_training(control, save: bool) -> None:
    """End the run after this step, with a checkpoint of it or, when its weights are not to be trusted, without."""
    control.should_save = save
    control.should_training_stop = True


class GracefulStop(TrainerCallback):
    """SIGTERM or Ctrl-C: finish the current step, save a resumable checkpoint, stop.
    A second Ctrl-C falls back to the default (immediate) interrupt."""

    def __init__(self):
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_train_begin(self, args, state, control, **kwargs):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if _any_process(self.received is not None):
            self.stopped_at = state.global_step
            stop_training(control, save=True)

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class NonFiniteGuard(TrainerCallback):
    """Stops at a step whose update made a trainable weight NaN/inf, before any checkpoint is written after
    it, so the last checkpoint on disk is a good one. Checks only the trainable (LoRA) weights, all in one
    multi-tensor max-norm: a NaN/inf anywhere makes it non-finite, and unlike a 2-norm it cannot overflow on
    finite weights.

    Reading that flag makes the host wait for the GPU to finish the step, and the GPU then idle while the
    host queues the next one: an earlier guard that read one check per tensor (448 of them) every step left the
    GPU idle 20 ms over two H200 steps (bench/step_gaps.py, bench/RESULTS.md). So the one flag is read at once
    only on a step that saves, logs, evaluates or ends the run; on any other it is read at the next step's end,
    long after the GPU computed it. A bad step is then named as it happened, and stopped one step later at most,
    with nothing saved after it either way."""

    def __init__(self):
        self.tripped_at: int | None = None
        self.unread: tuple[int, torch.Tensor | None] | None = None  # (step, its not-finite flag on the device)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        trainable = [_local(p.detach()) for p in model.parameters() if p.requires_grad]
        flag = torch.stack(torch._foreach_norm(trainable, math.inf)).isfinite().all().logical_not() if trainable else None
        earlier, self.unread = self.unread, (state.global_step, flag)
        if earlier is not None and self._read(earlier, control):
            return
        if control.should_save or control.should_log or control.should_evaluate or control.should_training_stop \
                or state.global_step >= state.max_steps:
            current, self.unread = self.unread, None
            self._read(current, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss) and self.tripped_at is None:
            self._trip(state, control)

    def _read(self, unread: tuple[int, torch.Tensor | None], control) -> bool:
        step, flag = unread
        if _any_process(flag is not None and bool(flag)) and self.tripped_at is None:
            self.tripped_at = step
            self.unread = None
            stop_training(control, save=False)
            return True
        return False

    def _trip(self, state, control) -> None:
        self.tripped_at = state.global_step
        stop_training(control, save=False)
