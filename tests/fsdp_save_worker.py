"""Run under torchrun (2 CPU processes, gloo) by test_save.py: a tiny PEFT model sharded with FSDP2,
its adapter saved by save_adapter, and check_adapter run on the two ways a sharded save goes wrong."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from alpaca_sft.train.run import IncompleteAdapterError, check_adapter, save_adapter  # noqa: E402

model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir)
# init_lora_weights=False: lora_B starts random, so a slice lost or zeroed cannot pass for trained
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for layer in model.base_model.model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)

save_adapter(model, out / "gathered", AutoTokenizer.from_pretrained(model_dir), is_main_process=rank == 0)

errors = {}
if rank == 0:
    # What transformers' Trainer.save_model leaves under FSDP's SHARDED_STATE_DICT: no adapter at all.
    (out / "nothing").mkdir()
    # What FSDP2 + PEFT once saved (accelerate#4206): each tensor as the main process holds it, its own slice.
    local = {n: p.to_local() for n, p in model.named_parameters() if p.requires_grad}
    model.save_pretrained(out / "rank0-slice", state_dict=local)
    for case in ("nothing", "rank0-slice"):
        try:
            check_adapter(out / case, model, trained)
        except IncompleteAdapterError as err:
            errors[case] = str(err)
    torch.save(trained, out / "trained.pt")
    (out / "errors.json").write_text(json.dumps(errors))
dist.destroy_process_group()
