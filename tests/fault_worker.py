"""train_sft.py's command line, killed (SIGKILL, as a crash or the OOM killer would) at one point of the save
of checkpoint-STEP:

    python tests/fault_worker.py POINT STEP <train_sft.py flags>

after_adapter: the adapter written, the optimizer state not; inside_optimizer: optimizer.pt half-written;
before_seal: every file of the checkpoint written, its seal (train/checkpoints.py) not."""

import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import Trainer  # noqa: E402

import train_sft  # noqa: E402
from alpaca_sft.train import checkpoints  # noqa: E402

point, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if point == "after_adapter":
    save_optimizer = Trainer._save_optimizer_and_scheduler

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.state.global_step == step:
            die()
        return save_optimizer(self, output_dir)

    Trainer._save_optimizer_and_scheduler = _save_optimizer_and_scheduler
elif point == "inside_optimizer":
    torch_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(f"checkpoint-{step}/optimizer.pt"):
            Path(f).write_bytes(b"PK\x03\x04 cut short")
            die()
        return torch_save(obj, f, *args, **kwargs)

    torch.save = save
elif point == "before_seal":
    seal = checkpoints.CheckpointSeal.on_save

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == step:
            die()
        return seal(self, args, state, control, **kwargs)

    checkpoints.CheckpointSeal.on_save = on_save
else:
    sys.exit(f"unknown point {point}")

sys.exit(train_sft.cli(argv))
