"""The finished adapter is whole under every launcher: gathered from FSDP2 shards (2 CPU processes),
and a save that lost tensors or kept one process's slice is refused, not reported as completed."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def fsdp_saves(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-save")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "tests" / "fsdp_save_worker.py"),
         str(tiny_model_dir), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_adapter_gathered_from_fsdp_shards_is_whole_and_equals_what_was_trained(fsdp_saves, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = torch.load(fsdp_saves / "trained.pt")
    saved = load_file(fsdp_saves / "gathered" / "adapter_model.safetensors")
    assert len(saved) == len(trained) == 2 * 2 * 7  # A and B of q,k,v,o,gate,up,down in 2 layers
    # PEFT loads it onto an unsharded base, every tensor at full shape and value
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), fsdp_saves / "gathered")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == trained.keys()
    for name, tensor in trained.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    assert (fsdp_saves / "gathered" / "tokenizer_config.json").is_file()
    assert json.loads((fsdp_saves / "gathered" / "generation_config.json").read_text())["eos_token_id"] in (2, [2])


@pytest.mark.slow
def test_a_sharded_save_that_lost_tensors_or_kept_a_slice_is_refused(fsdp_saves):
    errors = json.loads((fsdp_saves / "errors.json").read_text())
    # No adapter at all: what Trainer.save_model writes under FSDP's SHARDED_STATE_DICT.
    assert "q_proj.lora_A.weight: missing" in errors["nothing"]
    # Each tensor as the main process holds it: half of its rows (accelerate#4206).
    assert "q_proj.lora_B.weight: shape [32, 8], the trained tensor is [64, 8]" in errors["rank0-slice"]
