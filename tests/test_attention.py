"""Packed rows: the per-token loss of a packed batch equals that of its examples run one by one, with
every attention the pipeline offers, as long as the batch carries TRL's packed position_ids. And the
kernels "auto" picks: FlashAttention where it runs, Liger's Triton RoPE kept."""

import os
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from alpaca_sft.kernels.attention import DOCUMENT_FLEX, resolve_attention
from alpaca_sft.kernels.liger import pin_liger_rope_to_triton


def per_token_loss(logits, labels):
    return torch.nn.functional.cross_entropy(
        logits[:-1].float(), labels[1:], ignore_index=-100, reduction="none"
    )


@pytest.fixture(scope="module")
def examples():
    torch.manual_seed(0)
    return [
        {"input_ids": ids, "labels": [-100] * (len(ids) // 2) + ids[len(ids) // 2 :]}
        for ids in (torch.randint(3, 32000, (n,)).tolist() for n in (17, 40, 5, 64, 33))
    ]


def load(model_dir, attn):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False
    return model


def one_by_one_losses(model, examples):
    losses = []
    for example in examples:
        logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
        # A packed row has no cross-boundary target: the next example's first token is masked.
        losses += [per_token_loss(logits, torch.tensor(example["labels"])), torch.zeros(1)]
    return torch.cat(losses)[:-1]


@pytest.mark.parametrize("attn", [DOCUMENT_FLEX, "sdpa", "eager"])
def test_packed_batch_loss_equals_one_by_one(tiny_model_dir, examples, attn):
    # transformers builds a per-example mask from the packed position_ids for sdpa and eager itself;
    # document_flex reads the example boundaries (cu_seq_lens) that TRL's collator derives from them.
    model = load(tiny_model_dir, attn).train()  # training mode + grads: the path training takes
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert batch["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples)) and "position_ids" in batch
    packed = model(**batch)
    packed.loss.backward()  # the backward pass runs through the per-example mask too
    trained = batch["labels"][0][1:] != -100
    assert trained.sum() > 50
    torch.testing.assert_close(per_token_loss(packed.logits[0], batch["labels"][0])[trained],
                               one_by_one_losses(model, examples)[trained], rtol=1e-4, atol=1e-4)


def test_a_packed_row_without_position_ids_leaks(tiny_model_dir, examples):
    # The check has teeth: the same row given as one sequence lets each example see the ones before it.
    model = load(tiny_model_dir, "sdpa")
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    trained = batch["labels"][0][1:] != -100
    leaky = per_token_loss(model(input_ids=batch["input_ids"]).logits[0], batch["labels"][0])
    assert not torch.allclose(leaky[trained], one_by_one_losses(model, examples)[trained], atol=1e-2)


def test_flex_path_matches_one_by_one(tiny_model_dir, examples):
    # Without grads the CPU takes the flex_attention path the GPU trains with (uncompiled here).
    model = load(tiny_model_dir, DOCUMENT_FLEX).eval()
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    with torch.no_grad():
        packed = model(**batch).logits[0]
        separate = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples])
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-4)


def test_auto_picks_document_flex_for_packed_rows_and_passes_other_names_through():
    assert resolve_attention("auto", packing=True) == DOCUMENT_FLEX  # no flash-attn / no GPU here
    assert resolve_attention("auto", packing=False) == "sdpa"
    assert resolve_attention("sdpa", packing=True) == "sdpa"


@pytest.mark.parametrize(
    "capability, fa4, fa2, expected",
    [
        ((9, 0), True, False, "flash_attention_4"),  # Hopper with flash-attn-4: the fastest measured
        ((9, 0), True, True, "flash_attention_4"),
        ((8, 0), True, False, DOCUMENT_FLEX),  # FA4 on an Ampere card: never measured, not chosen
        ((8, 0), False, True, "flash_attention_2"),
        ((9, 0), False, False, DOCUMENT_FLEX),
    ],
)
def test_auto_on_a_gpu_picks_flash_attention_only_where_it_runs(monkeypatch, capability, fa4, fa2, expected):
    from alpaca_sft.kernels import attention

    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention.torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(attention, "is_flash_attn_4_available", lambda: fa4)
    monkeypatch.setattr(attention, "is_flash_attn_2_available", lambda: fa2)
    assert resolve_attention("auto", packing=True) == expected
    assert resolve_attention("document_flex", packing=True) == DOCUMENT_FLEX


def fake_liger(monkeypatch, rope_impls):
    """A Liger whose per-op dispatch knows these RoPE implementations."""
    backends = types.ModuleType("liger_kernel.backends")
    backends.all_impls = lambda op: list(rope_impls) if op == "rope" else []
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.backends", backends)


def test_liger_rope_is_pinned_to_triton_unless_the_user_chose_another(monkeypatch):
    monkeypatch.delenv("LIGER_KERNEL_IMPL_ROPE", raising=False)  # restored after the test either way
    fake_liger(monkeypatch, ["nvidia-cutedsl", "nvidia-triton"])
    pin_liger_rope_to_triton()
    assert os.environ["LIGER_KERNEL_IMPL_ROPE"] == "nvidia-triton"

    monkeypatch.setenv("LIGER_KERNEL_IMPL_ROPE", "nvidia-cutedsl")
    pin_liger_rope_to_triton()
    assert os.environ["LIGER_KERNEL_IMPL_ROPE"] == "nvidia-cutedsl"


def test_liger_without_a_triton_rope_or_without_dispatch_is_left_alone(monkeypatch):
    monkeypatch.delenv("LIGER_KERNEL_IMPL_ROPE", raising=False)
    fake_liger(monkeypatch, ["nvidia-cutedsl"])  # pinning a missing kernel would fail at the first forward
    pin_liger_rope_to_triton()
    assert "LIGER_KERNEL_IMPL_ROPE" not in os.environ

    monkeypatch.setitem(sys.modules, "liger_kernel.backends", None)  # an older Liger: the import fails
    pin_liger_rope_to_triton()
    assert "LIGER_KERNEL_IMPL_ROPE" not in os.environ
