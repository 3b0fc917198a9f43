"""The fused LoRA forward computes PEFT's LoRA: same loss, same LoRA gradients, same input gradients;
and layers it does not cover still run PEFT's own forward."""

import copy
import gc
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.helpers import disable_input_dtype_casting
from transformers import AutoModelForCausalLM

from alpaca_sft.kernels.fused_lora import fuse_lora, shared_input_groups


def adapted(model_dir, dtype=torch.float32, **lora):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    # init_lora_weights=False: B random too, so that B's gradient and the LoRA term are not zero
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, **lora)
    return get_peft_model(base, config)


def loss_and_grads(model, input_ids):
    model.zero_grad()
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=input_ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, embeds.grad.clone()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.fixture(scope="module")
def batch():
    return torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(1))


def test_fused_lora_matches_peft_in_fp32(tiny_model_dir, batch):
    reference = adapted(tiny_model_dir)
    fused = copy.deepcopy(reference)
    assert fuse_lora(fused) == 2 * 7  # two layers, seven adapted linears each

    loss_ref, grads_ref, input_grad_ref = loss_and_grads(reference, batch)
    loss, grads, input_grad = loss_and_grads(fused, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # Summed in another order than PEFT's (fp32 rounding, which varies with the CPU's GEMM kernels: 7e-7 seen)
    torch.testing.assert_close(input_grad, input_grad_ref, rtol=1e-4, atol=1e-6)


def test_sibling_layers_share_their_input_and_match_each_layer_alone(tiny_model_dir, batch):
    # q/k/v and gate/up as groups: one rank-r GEMM for the A's, one input gradient. The same loss and
    # gradients as every layer on its own (fp32: equal to rounding), and as PEFT (the test above).
    alone = adapted(tiny_model_dir)
    grouped = copy.deepcopy(alone)
    fuse_lora(alone, share_inputs=False)
    fuse_lora(grouped)
    assert shared_input_groups(alone) == 0 and shared_input_groups(grouped) == 2 * 2  # per layer: q/k/v, gate/up

    loss_ref, grads_ref, input_grad_ref = loss_and_grads(alone, batch)
    loss, grads, input_grad = loss_and_grads(grouped, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    for name in grads:  # sums in another order: fp32 rounding apart
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(input_grad, input_grad_ref, rtol=1e-5, atol=1e-6)


def test_a_sibling_called_on_another_input_computes_its_own(tiny_model_dir):
    # The leader (q) leaves k's and v's outputs for their own calls on the same tensor: a call on any other
    # input, or on that tensor changed in place since, must not get them.
    reference = adapted(tiny_model_dir)
    grouped = copy.deepcopy(reference)
    fuse_lora(grouped)
    attention = grouped.base_model.model.model.layers[0].self_attn
    expected = reference.base_model.model.model.layers[0].self_attn
    x, y = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2)).unbind(0)
    with torch.no_grad():
        attention.q_proj(x)
        torch.testing.assert_close(attention.k_proj(y), expected.k_proj(y))  # another input
        torch.testing.assert_close(attention.v_proj(x), expected.v_proj(x))  # the leader's: handed over
        attention.q_proj(x)
        x.mul_(2)  # same tensor, new values
        torch.testing.assert_close(attention.k_proj(x), expected.k_proj(x))
        torch.testing.assert_close(attention.k_proj(x), expected.k_proj(x))  # nothing left over from the leader


def test_outputs_left_for_siblings_that_never_read_them_go_once_the_next_group_runs(tiny_model_dir, monkeypatch):
    # q leaves k's and v's outputs for their calls; a model that never makes them (another order, a layer skipped)
    # must not keep those outputs alive past the next group's input
    from alpaca_sft.kernels import fused_lora

    grouped = adapted(tiny_model_dir)
    fuse_lora(grouped)
    layer = grouped.base_model.model.model.layers[0]
    left = []
    real = fused_lora._SharedInputLora.apply
    monkeypatch.setattr(fused_lora._SharedInputLora, "apply",
                        lambda *a: (out := real(*a), left.extend(weakref.ref(o) for o in out[1:]))[0])
    x, y = torch.randn(2, 1, 5, 64, generator=torch.Generator().manual_seed(3)).unbind(0)
    with torch.no_grad():
        layer.self_attn.q_proj(x)
        layer.mlp.gate_proj(y)  # the MLP's group, on another input
        layer.mlp.up_proj(y)
    gc.collect()
    assert len(left) == 2 + 1 and not any(ref() is not None for ref in left)


def test_fused_lora_in_bf16_is_as_close_to_fp32_as_peft(tiny_model_dir, batch):
    # The GPU recipe's numerics: bf16 base, fp32 LoRA weights, bf16 autocast. The fused path rounds in
    # other places than PEFT (the rank-r product before the big GEMM adds onto it, not the big product
    # before the small one is added), so the two agree to bf16's precision, not bit for bit; judged
    # against the same model in fp32, the fused gradients are at least as close as PEFT's.
    truth = loss_and_grads(adapted(tiny_model_dir), batch)
    reference = adapted(tiny_model_dir, dtype=torch.bfloat16)  # PEFT keeps the LoRA weights fp32
    fused = copy.deepcopy(reference)
    fuse_lora(fused)
    with torch.autocast("cpu", dtype=torch.bfloat16), disable_input_dtype_casting(reference):  # as train() runs it
        loss_ref, grads_ref, _ = loss_and_grads(reference, batch)
        loss, grads, _ = loss_and_grads(fused, batch)
    assert abs(loss.item() - loss_ref.item()) / loss_ref.item() < 2e-3
    assert abs(loss.item() - truth[0].item()) / truth[0].item() < 2e-3
    to_truth, peft_to_truth = {}, {}
    for name in grads:
        assert grads[name].dtype == grads_ref[name].dtype == torch.float32
        assert cosine(grads[name], grads_ref[name]) > 0.998, name
        to_truth[name], peft_to_truth[name] = cosine(grads[name], truth[1][name]), cosine(grads_ref[name], truth[1][name])
        assert to_truth[name] > peft_to_truth[name] - 5e-4, name
    assert sum(to_truth.values()) >= sum(peft_to_truth.values())


def test_uncovered_layers_keep_peft_forward(tiny_model_dir, batch):
    model = adapted(tiny_model_dir, lora_dropout=0.5)
    fuse_lora(model)
    model.train()
    torch.manual_seed(3)
    first = model(input_ids=batch).logits
    torch.manual_seed(3)
    second = model(input_ids=batch).logits
    torch.manual_seed(4)
    third = model(input_ids=batch).logits
    assert torch.equal(first, second) and not torch.equal(first, third)  # PEFT's dropout still applies

    model.eval()  # no dropout: the LoRA term is there, and a disabled adapter removes it
    with torch.no_grad():
        tuned = model(input_ids=batch).logits
        with model.disable_adapter():
            base = model(input_ids=batch).logits
        model.merge_adapter()
        merged = model(input_ids=batch).logits
    assert not torch.allclose(tuned, base, atol=1e-3)
    torch.testing.assert_close(merged, tuned, rtol=1e-4, atol=1e-4)


def test_fused_lora_matches_peft_on_a_4bit_base(tiny_model_dir, batch):
    # QLoRA's layer: the 4-bit base runs bitsandbytes' own kernels, only the LoRA term is fused.
    pytest.importorskip("bitsandbytes")  # a dependency of the project; absent where a GPU machine was not given it
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=quantization)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    reference = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    fused = copy.deepcopy(reference)
    assert fuse_lora(fused) == 14

    loss_ref, grads_ref, input_grad_ref = loss_and_grads(reference, batch[:, :12])
    loss, grads, input_grad = loss_and_grads(fused, batch[:, :12])
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(input_grad, input_grad_ref, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_fused_lora_under_gradient_checkpointing_matches_it_without(tiny_model_dir, batch, use_reentrant):
    # The checkpointing recipes (qlora-24gb) recompute each layer in backward. Non-reentrant
    # checkpointing lets a backward unpack each saved tensor once only: a second read of
    # ctx.saved_tensors fails there, and nowhere else.
    reference = adapted(tiny_model_dir)
    fuse_lora(reference)
    checkpointed = copy.deepcopy(reference)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed.train()
    reference.train()

    loss_ref, grads_ref, input_grad_ref = loss_and_grads(reference, batch)
    loss, grads, input_grad = loss_and_grads(checkpointed, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(input_grad, input_grad_ref, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_fused_lora_on_a_bf16_base_needs_no_bitsandbytes(tiny_model_dir):
    # PEFT's bnb module imports bitsandbytes, which only a 4-bit base needs: a process without it still fuses
    import subprocess
    import sys

    from conftest import REPO

    script = f"""
import sys
sys.modules["bitsandbytes"] = None  # an import of it fails, as where it is not installed
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from alpaca_sft.kernels.fused_lora import fuse_lora
model = get_peft_model(AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}), LoraConfig(target_modules="all-linear"))
print(fuse_lora(model), model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["14", "32000"]
