"""The pipeline on four architectures, each a tiny random model with its family's tokenizer conventions
(tools/random_model.py): Mistral (<unk>, BOS), Llama 3 (byte-level, no pad, no unk), Qwen2 (no BOS, pad =
EOS, spare embedding rows), Gemma 3 (its own <pad>, head_dim != hidden/heads, a sliding window, tied
embeddings). For each: the special tokens, the supervised span, packed attention, fused LoRA, the FP8 base
and the merge."""

import copy
import json
import re

import pytest
import torch
from conftest import REPO, THREE, needs_cpu_fp8, write_jsonl
from peft import LoraConfig, PeftModel, get_peft_model
from random_model import ARCHITECTURES, build_random_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from alpaca_sft.data.dataset import build_dataset
from alpaca_sft.data.template import render_prompt
from alpaca_sft.data.tokenize import IGNORE_INDEX
from alpaca_sft.kernels.attention import DOCUMENT_FLEX, resolve_attention
from alpaca_sft.kernels.fp8_base import Fp8FrozenLinear, quantize_frozen_base, quantize_rows
from alpaca_sft.kernels.fused_lora import fuse_lora
from alpaca_sft.models.tokenizer import NEW_PAD, load_tokenizer
from alpaca_sft.release.merge import logits_on, merge, save_merged

# What each family's tokenizer brings (pad: as the base ships it) and what the pipeline must make of it.
FAMILY = {
    "mistral": dict(bos="<s>", eos="</s>", shipped_pad=None, pad="<unk>"),
    "llama": dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", shipped_pad=None, pad=r"<\|reserved_special_token_\d+\|>"),
    "qwen2": dict(bos=None, eos="<|endoftext|>", shipped_pad="<|endoftext|>", pad=re.escape(NEW_PAD)),
    "gemma3": dict(bos="<bos>", eos="<eos>", shipped_pad="<pad>", pad="<pad>"),
}
GEMMA_WINDOW = 8  # tools/random_model.py's sliding window for gemma3: every packed document below is longer
LENGTHS = (17, 40, 9, 64, 33)
ADAPTED_PER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(arch, tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)


@pytest.fixture(scope="module")
def arch_tokenizer(model_dir):
    return load_tokenizer(str(model_dir))


@pytest.fixture(scope="module")
def vocab_size(model_dir):
    return AutoConfig.from_pretrained(model_dir).vocab_size


def load(model_dir, dtype=torch.float32, attn="sdpa", **config):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn, **config)
    # as training runs (train/run.py): with a cache, transformers reads no packed rows from the position_ids
    model.config.use_cache = False
    return model


def adapted(model_dir, dtype=torch.float32):
    torch.manual_seed(0)
    # init_lora_weights=False: B random too, so that B's gradient and the LoRA term are not zero
    return get_peft_model(load(model_dir, dtype), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                             init_lora_weights=False))


def random_ids(vocab_size, *shape, seed=1):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# --- 1. special tokens --------------------------------------------------------------------------------

def test_each_familys_special_tokens_are_settled(arch, model_dir, arch_tokenizer, vocab_size):
    family, tokenizer = FAMILY[arch], arch_tokenizer
    shipped = AutoTokenizer.from_pretrained(model_dir)
    assert shipped.pad_token == family["shipped_pad"]  # the case each family puts to load_tokenizer
    assert tokenizer.eos_token == family["eos"]
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert re.fullmatch(family["pad"], tokenizer.pad_token), tokenizer.pad_token
    if arch == "qwen2":  # nothing to pad with: a new token, in one of the embedding's spare rows
        assert len(shipped) <= tokenizer.pad_token_id < vocab_size
    assert tokenizer.pad_token_id < vocab_size

    ids = tokenizer(render_prompt("Name the capital of Japan."))["input_ids"]
    if family["bos"] is None:
        assert tokenizer.bos_token_id is None and ids[0] not in tokenizer.all_special_ids
    else:
        assert tokenizer.bos_token == family["bos"] and ids[0] == tokenizer.bos_token_id
        assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in ids  # a prompt never says "stop"


# --- 2. the supervised span ---------------------------------------------------------------------------

RECORDS = THREE + [
    {"instruction": "Write a Python function that returns the square of a number.", "input": "",
     "output": "def square(x):\n    return x * x"},
    {"instruction": "Reply in Japanese.", "input": "Hello", "output": "こんにちは！ 🙂 Ça va, «très» bien."},
]


def test_supervised_tokens_are_the_response_and_the_eos(arch, arch_tokenizer, tmp_path):
    tokenizer = arch_tokenizer
    dataset, report = build_dataset(str(write_jsonl(tmp_path / "few.jsonl", RECORDS)), tokenizer)
    assert len(dataset) == len(RECORDS) and report.boundary_retokenized == 0  # the prompt ends at a token boundary
    family_eos = tokenizer.convert_tokens_to_ids(FAMILY[arch]["eos"])
    for record, row in zip(RECORDS, dataset):
        ids, labels = row["input_ids"], row["labels"]
        prompt_ids = tokenizer(render_prompt(record["instruction"], record["input"]))["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids and labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        trained = [(i, label) for i, label in zip(ids, labels) if label != IGNORE_INDEX]
        assert len(trained) == len(ids) - len(prompt_ids) and all(i == label for i, label in trained)
        assert tokenizer.decode([i for i, _ in trained]) == record["output"] + FAMILY[arch]["eos"]
        assert labels[-1] == family_eos and ids.count(family_eos) == 1


# --- 3. packed rows -----------------------------------------------------------------------------------

def per_token_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="none")


@pytest.fixture(scope="module")
def examples(vocab_size):
    torch.manual_seed(0)
    return [{"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) // 2) + ids[len(ids) // 2 :]}
            for ids in (torch.randint(0, vocab_size, (n,)).tolist() for n in LENGTHS)]


@pytest.fixture(scope="module")
def separate_logits(model_dir, examples):
    """Each example run alone through transformers' eager attention (its mask and softmax written out):
    the reference every other attention is held to."""
    model = load(model_dir, attn="eager").eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]


def one_by_one_losses(separate_logits, examples):
    losses = []
    for logits, example in zip(separate_logits, examples):
        # A packed row has no cross-boundary target: the next example's first token is masked.
        losses += [per_token_loss(logits, torch.tensor(example["labels"])), torch.zeros(1)]
    return torch.cat(losses)[:-1]


def packed(examples):
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "position_ids" in batch
    return batch


# "auto" on a CPU, and every other attention the pipeline trains with on one. These models run on the CPU, even
# where a GPU is present: transformers' flex_attention calls torch's, which has no backward there ("FlexAttention
# does not support backward on CPU"), so it is judged without grads below, and on the GPU by bench/check_packing.py.
TRAINING_ATTENTIONS = [*dict.fromkeys([resolve_attention("auto", packing=True), DOCUMENT_FLEX, "sdpa", "eager"])]


@pytest.mark.parametrize("attn", TRAINING_ATTENTIONS)
def test_packed_batch_loss_equals_one_by_one(arch, model_dir, examples, separate_logits, attn):
    model = load(model_dir, attn=attn).train()  # training mode + grads: the path training takes
    batch = packed(examples)
    out = model(**batch)
    out.loss.backward()  # the backward pass runs through the per-example mask too
    trained = batch["labels"][0][1:] != IGNORE_INDEX
    assert trained.sum() > 50
    torch.testing.assert_close(per_token_loss(out.logits[0], batch["labels"][0])[trained],
                               one_by_one_losses(separate_logits, examples)[trained], rtol=1e-4, atol=1e-4)


# transformers compiles its flex_attention: 13 s a model on a CPU
@pytest.mark.parametrize("attn", [DOCUMENT_FLEX, pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_flex_paths_without_grads_match_one_by_one(arch, model_dir, examples, separate_logits, attn):
    # Without grads the CPU takes the flex_attention path the GPU trains with (uncompiled here), its block
    # mask carrying each layer's sliding window.
    model = load(model_dir, attn=attn).eval()
    with torch.no_grad():
        together = model(**packed(examples)).logits[0]
    torch.testing.assert_close(together, torch.cat(separate_logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn", [DOCUMENT_FLEX, "sdpa"])
def test_a_row_without_boundaries_equals_eager(arch, model_dir, examples, separate_logits, attn):
    # One document given without an attention_mask (a plain forward on one text, as the examples one by one
    # above) carries no boundaries and goes to the attention as it is: each layer's sliding window must
    # still hold there.
    model = load(model_dir, attn=attn).eval()
    with torch.no_grad():
        for example, reference in zip(examples, separate_logits):
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            torch.testing.assert_close(alone, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gemma3"], indirect=True)
def test_gemma3_sliding_window_shapes_the_outputs(model_dir, examples):
    # The packed-equals-separate checks above hold gemma3's window to account only if it matters: it does,
    # from the first position that has more tokens behind it than the window, and not before.
    longest = torch.tensor([max((e["input_ids"] for e in examples), key=len)])
    assert AutoConfig.from_pretrained(model_dir).sliding_window == GEMMA_WINDOW < min(LENGTHS)
    with torch.no_grad():
        windowed = load(model_dir).eval()(input_ids=longest).logits[0]
        unwindowed = load(model_dir, sliding_window=longest.shape[1]).eval()(input_ids=longest).logits[0]
    torch.testing.assert_close(windowed[:GEMMA_WINDOW], unwindowed[:GEMMA_WINDOW], rtol=1e-5, atol=1e-5)
    assert (windowed[GEMMA_WINDOW:] - unwindowed[GEMMA_WINDOW:]).abs().amax(-1).min() > 1e-3


# --- 4. fused LoRA ------------------------------------------------------------------------------------

def loss_and_grads(model, input_ids):
    model.zero_grad()
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, embeds.grad.clone()


def test_fused_lora_matches_peft_in_fp32(model_dir, vocab_size):
    batch = random_ids(vocab_size, 2, 24)
    reference = adapted(model_dir)
    fused = copy.deepcopy(reference)
    assert fuse_lora(fused) == 2 * ADAPTED_PER_LAYER

    loss_ref, grads_ref, input_grad_ref = loss_and_grads(reference, batch)
    loss, grads, input_grad = loss_and_grads(fused, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 2 * ADAPTED_PER_LAYER  # A and B of every layer
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # q/k/v and gate/up as one group sum their input gradients in another order than autograd: fp32 rounding apart
    torch.testing.assert_close(input_grad, input_grad_ref, rtol=1e-4, atol=1e-6)


# --- 5. the FP8 base ----------------------------------------------------------------------------------

def bf16_and_fp8(model_dir):
    bf16 = adapted(model_dir, torch.bfloat16)
    fuse_lora(bf16)
    fp8 = copy.deepcopy(bf16)
    return bf16, fp8, quantize_frozen_base(fp8)


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def test_fp8_base_converts_every_adapted_linear_layer(model_dir):
    bf16, fp8, converted = bf16_and_fp8(model_dir)
    fp8_sized = {name for name, m in lora_layers(bf16).items()
                 if m.base_layer.in_features % 16 == 0 and m.base_layer.out_features % 16 == 0}
    assert len(fp8_sized) == 2 * ADAPTED_PER_LAYER  # the tiny shapes are all multiples of 16
    left_in_bf16 = {name: f"bias={m.base_layer.bias is not None}" for name, m in sorted(lora_layers(fp8).items())
                    if not isinstance(m.base_layer, Fp8FrozenLinear)}
    assert not left_in_bf16 and converted == len(fp8_sized), f"left in bf16: {left_in_bf16}"


@needs_cpu_fp8
def test_fp8_layers_equal_a_dequantized_matmul_and_the_loss_stays_the_bf16_models(model_dir, vocab_size):
    bf16, fp8, converted = bf16_and_fp8(model_dir)
    layers = {name: m for name, m in lora_layers(fp8).items() if isinstance(m.base_layer, Fp8FrozenLinear)}
    assert len(layers) == converted > 0
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen[name] = (args[0], out)  # returns None: the output stays the layer's
        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    batch = random_ids(vocab_size, 2, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fp8 = fp8(input_ids=batch, labels=batch).loss.item()
    for hook in hooks:
        hook.remove()
    assert seen.keys() == layers.keys()
    for name, (x, out) in seen.items():
        # The reference: both FP8 operands dequantized to fp32, one fp32 matmul; LoRA's branch in fp32.
        layer, adapter = layers[name], layers[name].active_adapters[0]
        x2 = x.detach().reshape(-1, layer.base_layer.in_features)
        a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
        expected = ((q := quantize_rows(x2))[0].float() * q[1]) @ layer.base_layer.dequantized_weight().t()
        expected += (x2.float() @ a.t()) @ b.t() * layer.scaling[adapter]
        error = (out.float().reshape(expected.shape) - expected).norm() / expected.norm()
        assert out.shape[-1] == layer.base_layer.out_features and error < 1e-2, f"{name}: relative error {error:.2e}"

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16 = bf16(input_ids=batch, labels=batch).loss.item()
    assert abs(loss_fp8 - loss_bf16) / loss_bf16 < 0.01 and loss_fp8 != loss_bf16


# --- 6. merging ---------------------------------------------------------------------------------------

def test_merged_model_equals_base_plus_adapter_and_reloads_plainly(arch, model_dir, arch_tokenizer, tmp_path):
    tokenizer = arch_tokenizer
    adapted(model_dir).save_pretrained(tmp_path / "adapter")
    # of different lengths (left-padded in one batch), one longer than gemma3's window
    texts = [render_prompt("Name the capital of Japan."), "### Response:\nTokyo", "def square(x):\n    return x * x"]
    reference = logits_on(PeftModel.from_pretrained(load(model_dir), str(tmp_path / "adapter")), tokenizer, texts)
    assert (reference - logits_on(load(model_dir), tokenizer, texts)).abs().max() > 1.0  # the adapter matters

    merged, gap = merge(load(model_dir), tmp_path / "adapter", tokenizer, texts)
    assert gap < 1e-4
    folder = save_merged(merged, tokenizer, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no PEFT
    assert reloaded.config.model_type == AutoConfig.from_pretrained(model_dir).model_type
    torch.testing.assert_close(logits_on(reloaded, tokenizer, texts), reference, rtol=1e-4, atol=1e-4)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] in (
        tokenizer.eos_token_id, [tokenizer.eos_token_id])


FSDP_CONFIGS = ("fsdp.yaml", "fsdp_qlora.yaml")


@pytest.mark.parametrize("config", FSDP_CONFIGS)
def test_fsdp_configs_wrap_each_decoder_layer_of_any_family(config, model_dir, monkeypatch):
    """The FSDP configs name no layer class: accelerate launch's environment for them, then the plugin's wrap
    policy on this family's PEFT model, as Trainer prepares it, must put exactly its decoder layers in shards."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "accelerate_configs" / config), "train_sft.py"])
    for key, value in prepare_multi_gpu_env(_validate_launch_command(args)[0]).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    model = get_peft_model(load(model_dir), LoraConfig(r=4, target_modules="all-linear"))
    plugin.set_auto_wrap_policy(model)
    wrapped = {type(m).__name__ for m in model.modules()
               if plugin.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0)}
    assert wrapped == {type(model.base_model.model.model.layers[0]).__name__}
