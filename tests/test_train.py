"""Training on a tiny Mistral (real tokenizer, CPU): what moves, what is learned, what survives a stop."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import NO_VALIDATION, REPO, THREE, TINY, parse, train
from safetensors.torch import load_file

import train_sft
from alpaca_sft.data.template import render_prompt
from alpaca_sft.train.callbacks import GracefulStop


def greedy(model, tokenizer, prompt, max_new_tokens=30):
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def test_lora_weights_move_and_base_weights_do_not(tiny_model_dir, tmp_path):
    trainer = train(tiny_model_dir, tmp_path / "run", "--max_steps", 5, "--learning_rate", 1e-2).trainer
    original = load_file(tiny_model_dir / "model.safetensors")
    lora_b, base = {}, {}
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            lora_b[name] = param
        elif "lora_" not in name:
            base[name.replace("base_model.model.", "").replace(".base_layer", "")] = param
    # all-linear: q,k,v,o,gate,up,down in each of the 2 layers
    assert len(lora_b) == 2 * 7
    for name, param in lora_b.items():  # lora_B starts at zero: non-zero means it was trained
        assert param.abs().sum() > 0, name
    assert set(base) == set(original)
    for name, param in base.items():
        assert not param.requires_grad, name
        torch.testing.assert_close(param.detach(), original[name], rtol=0, atol=0, msg=name)
    adapter = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)


def test_one_named_target_module_is_adapted(tiny_model_dir, tmp_path):
    # TRL hands a one-name list to PEFT as the name alone, a pattern PEFT matches against whole module names
    train(tiny_model_dir, tmp_path / "run", "--max_steps", 1, "--lora_target_modules", "q_proj")
    adapted = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in load_file(tmp_path / "run" / "adapter_model.safetensors")}
    assert adapted == {"q_proj"}


def test_tuned_tiny_model_answers_and_stops_where_untuned_runs_on(tiny_model_dir, tuned_three):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tuned_three
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eos = tokenizer.eos_token_id
    prompts = [render_prompt(r["instruction"], r["input"]) for r in THREE]

    untuned = [greedy(base, tokenizer, p) for p in prompts]
    tuned_model = PeftModel.from_pretrained(base, out)
    tuned = [greedy(tuned_model, tokenizer, p) for p in prompts]
    for record, before, after in zip(THREE, untuned, tuned):
        assert len(before) == 30 and eos not in before  # runs to the token limit
        assert after[-1] == eos and after.count(eos) == 1  # stops by itself...
        assert tokenizer.decode(after[:-1]) == record["output"]  # ...right after the response
    saved_eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert saved_eos in (eos, [eos])  # transformers 5.17 writes a list


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(tiny_model_dir, tmp_path, monkeypatch):
    steps = ["--max_steps", 6, "--save_strategy", "steps", "--save_steps", 100, "--logging_steps", 1]
    train(tiny_model_dir, tmp_path / "straight", *steps)

    original = GracefulStop.on_step_end

    def sigterm_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(GracefulStop, "on_step_end", sigterm_at_step_3)
    handler_before = signal.getsignal(signal.SIGTERM)
    stopped = train(tiny_model_dir, tmp_path / "split", *steps)
    assert stopped.exit_code == 128 + signal.SIGTERM and "--resume_from_checkpoint true" in stopped.message
    assert (tmp_path / "split" / "checkpoint-3" / "adapter_model.safetensors").exists()
    summary = json.loads((tmp_path / "split" / "run_summary.json").read_text())
    assert summary["status"] == "stopped: SIGTERM at step 3" and summary["global_step"] == 3
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the handler restored

    monkeypatch.setattr(GracefulStop, "on_step_end", original)
    train(tiny_model_dir, tmp_path / "split", *steps, "--resume_from_checkpoint", "true")

    straight = json.loads((tmp_path / "straight" / "run_summary.json").read_text())
    resumed = json.loads((tmp_path / "split" / "run_summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["global_step"] == 6
    assert resumed["last_loss"] == pytest.approx(straight["last_loss"], rel=1e-5)
    # The record describes the whole run, not the part after the resume.
    assert resumed["tokens_seen"] == straight["tokens_seen"]
    assert resumed["first_loss"] == pytest.approx(straight["first_loss"], rel=1e-6)
    assert resumed["mean_logged_loss"] == pytest.approx(straight["mean_logged_loss"], rel=1e-5)
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    # A learning rate of 1e30 makes the LoRA weights overflow within a few steps.
    out = tmp_path / "run"
    outcome = train(tiny_model_dir, out, "--max_steps", 20, "--learning_rate", 1e30, "--max_grad_norm", 0,
                    "--save_strategy", "steps", "--save_steps", 1)
    assert outcome.exit_code == 1 and "became NaN/inf at step" in outcome.message
    tripped = json.loads((out / "run_summary.json").read_text())["global_step"]
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1] == tripped - 1  # nothing saved at or after the bad step
    assert f"checkpoint-{tripped - 1}" in outcome.message
    weights = load_file(out / f"checkpoint-{tripped - 1}" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a broken run

    # On a step that neither saves nor logs, the check is read at the next step's end (reading it at once
    # would stall the GPU every step): the same bad step is named, the run stops one step later, unsaved.
    late = tmp_path / "late"
    outcome = train(tiny_model_dir, late, "--max_steps", 20, "--learning_rate", 1e30, "--max_grad_norm", 0,
                    "--save_strategy", "steps", "--save_steps", 100, "--logging_steps", 100, "--eval_strategy", "no")
    assert outcome.exit_code == 1 and f"became NaN/inf at step {tripped}" in outcome.message
    assert json.loads((late / "run_summary.json").read_text())["global_step"] == tripped + 1
    assert not list(late.glob("checkpoint-*")) and not (late / "adapter_model.safetensors").exists()


def test_output_dir_holding_a_run_is_refused(tiny_model_dir, tmp_path, capsys):

    out = tmp_path / "run"
    train(tiny_model_dir, out, "--max_steps", 1)
    capsys.readouterr()
    assert train_sft.cli(["--config", str(TINY), "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out)]) == 1
    error = capsys.readouterr().err
    assert "already holds a run" in error and "--resume_from_checkpoint" in error


def test_run_outputs_reload_without_guesswork(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    train(tiny_model_dir, out, "--max_steps", 2, "--logging_steps", 1, "--hub_token", "hf_secret_value")
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["data"]["rows_kept"] == 24 and summary["data"]["trained_tokens"] == 314
    assert summary["first_loss"] > 0 and summary["tokens_seen"] > 0 and summary["wall_time_s"] > 0
    assert summary["attn_implementation"] == "document_flex"
    assert summary["versions"]["transformers"] and summary["versions"]["trl"]
    config_text = (out / "train_config.yaml").read_text()
    assert "hf_secret_value" not in config_text
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_secret_value" not in path.read_bytes(), path
    # The resolved config is itself a recipe.
    script_args, training_args, model_args = parse(config=out / "train_config.yaml")
    assert model_args.lora_r == 16 and training_args.max_steps == 2 and training_args.packing
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == "<unk>" and model.peft_config["default"].r == 16
    assert not list(out.glob("*.bin")) or [p.name for p in out.glob("*.bin")] == ["training_args.bin"]


def test_qlora_trains_on_cpu(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    trainer = train(tiny_model_dir, tmp_path / "run", "--load_in_4bit", "true", "--use_cpu", "true",
                    "--max_steps", 3, "--logging_steps", 1, "--learning_rate", 1e-2, "--dtype", "bfloat16").trainer
    linear = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(linear).__name__ == "Linear4bit"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    adapter = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert any(key.endswith("lora_B.weight") and w.abs().sum() > 0 for key, w in adapter.items())


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_machines(*args):
    """accelerate_configs/cpu_2machines.yaml as its comment says to start it: one launch per machine, alike but
    for --machine_rank, meeting at the loopback address; both must succeed."""
    port = free_port()
    launches = [subprocess.Popen(
        list(map(str, [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       REPO / "accelerate_configs/cpu_2machines.yaml", "--machine_rank", rank, "--main_process_port", port,
                       REPO / "train_sft.py", *args])),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [(launch.wait(timeout=600), *launch.communicate()) for launch in launches]
    for code, out, err in results:
        assert code == 0, err[-3000:]
    return results[0]


@pytest.mark.slow
def test_two_machines_match_one_process_save_one_adapter_and_resume(tiny_model_dir, tmp_path):
    # No validation: all 24 examples pack into 4 rows, which split evenly over 2 processes (an odd count
    # would make accelerate repeat a row on one process, and the two runs would see different tokens).
    common = ["--config", TINY, "--model_name_or_path", tiny_model_dir, "--max_steps", 4, "--logging_steps", 1,
              "--save_strategy", "steps", "--save_steps", 2, "--use_cpu", "true", *NO_VALIDATION]
    _, out, err = two_machines(*common, "--per_device_train_batch_size", 1, "--output_dir", tmp_path / "two")
    assert "find_unused_parameters=True" not in err  # DDP does no search for unused weights
    one = subprocess.run(list(map(str, [sys.executable, REPO / "train_sft.py", *common, "--per_device_train_batch_size", 2,
                                        "--output_dir", tmp_path / "one"])), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two_summary = json.loads((tmp_path / "two" / "run_summary.json").read_text())
    one_summary = json.loads((tmp_path / "one" / "run_summary.json").read_text())
    assert two_summary["world_size"] == 2 and one_summary["world_size"] == 1
    assert two_summary["status"] == "completed" and two_summary["tokens_seen"] == one_summary["tokens_seen"]
    two_losses = [h["loss"] for h in json.loads((tmp_path / "two" / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    one_losses = [h["loss"] for h in json.loads((tmp_path / "one" / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(two_losses) == 4 and two_losses == pytest.approx(one_losses, rel=1e-5)
    # one adapter, whole (train/run.py read it back and checked it), written once, by the main machine
    assert sorted(p.name for p in (tmp_path / "two").glob("*.safetensors")) == ["adapter_model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoint-2").glob("rng_state_*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    finished = load_file(tmp_path / "two" / "adapter_model.safetensors")
    # and resumed on the two machines from the middle, to the same adapter
    _, out, _ = two_machines(*common, "--per_device_train_batch_size", 1, "--output_dir", tmp_path / "two",
                             "--resume_from_checkpoint", tmp_path / "two" / "checkpoint-2")
    assert "set aside: checkpoint-4.superseded" in out
    resumed = load_file(tmp_path / "two" / "adapter_model.safetensors")
    for key in finished:
        torch.testing.assert_close(resumed[key], finished[key], rtol=1e-5, atol=1e-6, msg=key)


def test_adapter_inputs_kept_in_bf16_give_the_same_gradients_and_save_less(tiny_model_dir):
    """train_sft.py turns off PEFT's upcast of each adapted layer's input to the fp32 LoRA weights:
    under bf16 autocast the matmul is bf16 either way, so the loss and the LoRA gradients must be
    bit-identical, while backward keeps fewer bytes (no bf16 re-cast copies of the adapted inputs;
    on the 7B shape at 6 rows per step that is the difference between 66 GiB and out of memory)."""
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)  # PEFT's fp32 adapters
    input_ids = torch.randint(3, 32000, (2, 48))

    def run(keep_bf16: bool):
        model.zero_grad(set_to_none=True)
        saved = {}  # storage -> bytes: a tensor saved by several ops is kept once

        def pack(tensor):
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with disable_input_dtype_casting(model, active=keep_bf16), torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, sum(saved.values())

    loss_upcast, grads_upcast, saved_upcast = run(keep_bf16=False)
    loss_bf16, grads_bf16, saved_bf16 = run(keep_bf16=True)
    assert torch.equal(loss_upcast, loss_bf16)
    assert grads_upcast.keys() == grads_bf16.keys() and len(grads_bf16) == 2 * 2 * 7  # A and B, 7 modules, 2 layers
    for name in grads_bf16:
        assert torch.equal(grads_upcast[name], grads_bf16[name]), name
    # at least one bf16 copy of an adapted input (tokens x hidden) per layer is no longer kept
    one_copy = input_ids.numel() * base.config.hidden_size * 2
    assert saved_upcast - saved_bf16 >= base.config.num_hidden_layers * one_copy


def test_a_run_whose_adapter_cannot_be_saved_whole_fails_instead_of_completing(tiny_model_dir, tmp_path, monkeypatch):
    import torch.distributed.checkpoint.state_dict as dcp_state_dict

    gather = dcp_state_dict.get_model_state_dict

    def half_of_each_tensor(model, options=None):  # what a lost shard looks like
        return {name: tensor[: tensor.shape[0] // 2] for name, tensor in gather(model, options=options).items()}

    monkeypatch.setattr(dcp_state_dict, "get_model_state_dict", half_of_each_tensor)
    out = tmp_path / "run"
    outcome = train(tiny_model_dir, out, "--max_steps", 1)
    assert outcome.exit_code == 1 and "is not what was trained" in outcome.message
    assert "q_proj.lora_A.weight: shape [8, 64], the trained tensor is [16, 64]" in outcome.message
    assert json.loads((out / "run_summary.json").read_text())["status"].startswith("failed: the adapter saved")
