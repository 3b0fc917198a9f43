"""The FP8 base's math on the CPU (torch's emulated FP8 GEMM): the quantization round trip, the layer
and its gradients against a dequantized-matmul reference, and a whole tiny model against bf16.
Its speed is measured on an H100 (bench/RESULTS.md); training with it is refused here (test_cli)."""

import copy

import pytest
import torch
from conftest import needs_cpu_fp8
from torch import nn
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from alpaca_sft.kernels import fp8_base
from alpaca_sft.kernels.fp8_base import E4M3_MAX, Fp8FrozenLinear, quantize_frozen_base, quantize_rows
from alpaca_sft.kernels.fused_lora import fuse_lora
from alpaca_sft.kernels.shared_input import input_cache


def dequantize(q, scale):
    return q.float() * scale


def test_quantize_rows_round_trip_keeps_e4m3_precision_in_every_row():
    torch.manual_seed(0)
    x = torch.randn(6, 64) * torch.tensor([1.0, 1e3, 1e-4, 0.0, 7.0, 1e-6]).unsqueeze(1)  # rows of any size, one all zero
    x[4, 5] = 300.0  # one outlier: its row's other values go to e4m3's small (subnormal) numbers
    q, scale = quantize_rows(x.to(torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1) and scale.dtype == torch.float32
    back = dequantize(q, scale)
    assert torch.isfinite(back).all() and (back[3] == 0).all()
    # each non-zero row's largest value lands on e4m3's largest: no row wastes range or saturates
    assert (q.float().abs().amax(dim=1)[[0, 1, 2, 4, 5]] == E4M3_MAX).all()
    exact = x.to(torch.bfloat16).float()
    # e4m3 keeps 3 mantissa bits: half a step is 1/16 of a value, plus half the subnormal step (2^-9) near zero
    bound = exact.abs() / 16 + scale * 2.0**-10
    assert ((back - exact).abs() <= bound * 1.0001).all()
    assert (back - exact).abs().max() > 0  # and it is a quantization: something was rounded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on GPUs; run on the device")
@pytest.mark.parametrize("columns", [1024, 4096, 14336, 80])
def test_gpu_row_quantizer_gives_the_reference_bytes(columns):
    torch.manual_seed(0)
    x = torch.randn(1000, columns, device="cuda", dtype=torch.bfloat16) * torch.logspace(-4, 3, 1000, device="cuda")[:, None]
    x[7] = 0
    q, scale = fp8_base.quantize_activation(x)
    q_ref, scale_ref = quantize_rows(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    q_t, _ = fp8_base.quantize_activation(x.t()[:, :512])  # a strided view: made contiguous first
    assert torch.equal(q_t.view(torch.uint8), quantize_rows(x.t()[:, :512])[0].view(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FP8 GEMMs at speed run on Hopper GPUs; run on the device")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("input_grad", ["fp8", "bf16"])
def test_gpu_fp8_layer_with_and_without_a_bias_matches_a_dequantized_reference(bias, input_grad):
    # Gemma-3-270m's q_proj shape (640 -> 4 heads x 256), with a frozen bias as Qwen2's q/k/v have; on the GPU the
    # row quantizer and the scaled GEMM are the Triton and cuBLAS kernels training runs
    torch.manual_seed(0)
    linear = nn.Linear(640, 1024, bias=bias, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    layer = Fp8FrozenLinear(linear, input_grad)
    x = torch.randn(300, 640, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lora_a = (torch.randn(16, 640, device="cuda") * 0.05).requires_grad_(True)
    lora_b = (torch.randn(1024, 16, device="cuda") * 0.05).requires_grad_(True)
    reference = x.detach().float() @ layer.dequantized_weight().t() + (linear.bias.float() if bias else 0)
    out = layer(x)
    assert ((out.float() - reference).norm() / reference.norm()).item() < 0.05
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    exact_grad = grad_out.float() @ linear.weight.float()
    error = ((x.grad.float() - exact_grad).norm() / exact_grad.norm()).item()
    assert error < (0.01 if input_grad == "bf16" else 0.08)  # bf16 rounding; e4m3's (5.9% measured on the H100)
    x.grad = None
    with_lora = layer.forward_with_lora(x, lora_a, lora_b, 2.0)  # the Triton low-rank add; bf16's addmm in backward
    with_lora.backward(grad_out)
    exact_grad += (grad_out.float() @ lora_b.detach() * 2.0) @ lora_a.detach()
    error = ((x.grad.float() - exact_grad).norm() / exact_grad.norm()).item()
    assert error < (0.01 if input_grad == "bf16" else 0.08)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on GPUs; run on the device")
@pytest.mark.parametrize("rows,columns,rank", [(12250, 4096, 16), (1000, 14336, 16), (77, 1024, 64)])
def test_gpu_low_rank_add_is_one_rounding_of_the_exact_sum(rows, columns, rank):
    torch.manual_seed(0)
    c = torch.randn(rows, columns, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(rows, rank, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(columns, rank, device="cuda", dtype=torch.bfloat16).t()  # a transposed view, as LoRA's B^T
    exact = (c.double() + a.double() @ b.double()).to(torch.bfloat16)
    result = fp8_base.add_low_rank_(c, a, b)
    assert result.data_ptr() == c.data_ptr()  # in place
    torch.testing.assert_close(result, exact, rtol=2**-7, atol=1e-5)  # within one bf16 rounding step
    assert (result != exact).float().mean() < 0.01  # fp32 accumulation: rarely a step off


@pytest.fixture
def layer_and_inputs():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 13, 64, dtype=torch.bfloat16, requires_grad=True)  # 26 tokens: not a multiple of 16
    lora_a = (torch.randn(8, 64) * 0.1).requires_grad_(True)  # fp32, as PEFT keeps them
    lora_b = (torch.randn(48, 8) * 0.1).requires_grad_(True)
    return Fp8FrozenLinear(linear), x, lora_a, lora_b


@needs_cpu_fp8
def test_fp8_layer_and_its_gradients_match_a_dequantized_matmul_reference(layer_and_inputs):
    base, x, lora_a, lora_b = layer_and_inputs
    scale = 2.0
    out = base.forward_with_lora(x, lora_a, lora_b, scale)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    # The reference: every FP8 operand dequantized to fp32, one fp32 matmul; LoRA's branch in fp32 autograd.
    x2, g = x.detach().reshape(-1, 64), grad_out.reshape(-1, 48)
    w_forward = dequantize(base.weight_q, base.weight_scale.t())  # N x K
    w_backward = dequantize(base.weight_t_q, base.weight_t_scale.t())  # K x N, quantized per input channel
    a, b = lora_a.detach().requires_grad_(True), lora_b.detach().requires_grad_(True)
    x_ref = x2.float().requires_grad_(True)
    lora_out = (x_ref @ a.t()) @ b.t() * scale
    expected = dequantize(*quantize_rows(x2)) @ w_forward.t() + lora_out
    lora_out.backward(g.float())
    expected_grad_x = dequantize(*quantize_rows(g)) @ w_backward.t() + x_ref.grad

    def close(actual, reference, tolerance):
        error = (actual.float() - reference).norm() / reference.norm()
        assert error < tolerance, f"relative error {error:.2e}"

    close(out.reshape(-1, 48), expected, 1e-2)  # the output and the GEMM's result rounded to bf16
    close(x.grad.reshape(-1, 64), expected_grad_x, 1e-2)
    close(lora_a.grad, a.grad, 2e-2)  # LoRA's gradients never touch FP8: bf16 math only
    close(lora_b.grad, b.grad, 2e-2)
    assert lora_a.grad.dtype == lora_b.grad.dtype == torch.float32
    # the two weight layouts are each quantized along their own channel: both are close to the bf16 weight
    weight = (w_forward + w_backward.t()) / 2
    assert (w_forward - weight).norm() / weight.norm() < 0.05 and not torch.equal(w_forward, w_backward.t())


@needs_cpu_fp8
def test_bf16_input_gradient_is_the_bf16_weights_under_the_same_fp8_forward(layer_and_inputs):
    fp8_layer, x, lora_a, lora_b = layer_and_inputs
    linear = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16).requires_grad_(False)
    linear.weight.copy_(fp8_layer.dequantized_weight().to(torch.bfloat16) * 1.01)  # not on the e4m3 grid
    fp8_layer, bf16_grad_layer = Fp8FrozenLinear(linear), Fp8FrozenLinear(linear, "bf16")
    assert bf16_grad_layer.weight_t_q is None and bf16_grad_layer.weight_bf16.data_ptr() == linear.weight.data_ptr()
    grad_out = torch.randn(2, 13, 48, dtype=torch.bfloat16)
    results = {}
    for name, layer in (("fp8", fp8_layer), ("bf16", bf16_grad_layer)):
        x_i, a, b = (t.detach().clone().requires_grad_(True) for t in (x, lora_a, lora_b))
        out = layer.forward_with_lora(x_i, a, b, 2.0)
        out.backward(grad_out)
        results[name] = out, x_i.grad, a.grad, b.grad
    assert torch.equal(results["fp8"][0], results["bf16"][0])  # one forward: e4m3 weights, rows quantized alike
    torch.testing.assert_close(results["fp8"][2], results["bf16"][2])  # LoRA's gradients never touch the base's
    # the input gradient: g W + (g B scale) A, exact in fp32 against the bf16 weight
    g = grad_out.reshape(-1, 48).float()
    exact = g @ linear.weight.float() + (g @ lora_b.detach() * 2.0) @ lora_a.detach()

    def error(name):
        return ((results[name][1].reshape(-1, 64).float() - exact).norm() / exact.norm()).item()

    assert error("bf16") < 0.01 and error("fp8") > 3 * error("bf16")  # bf16's rounding; e4m3's is ~8x that


@needs_cpu_fp8
def test_fp8_layer_alone_is_the_frozen_base(layer_and_inputs):
    base, x, _, _ = layer_and_inputs
    out = base(x)
    out.sum().backward()
    reference = x.detach().float().reshape(-1, 64) @ base.dequantized_weight().t()
    assert (out.float().reshape(-1, 48) - reference).norm() / reference.norm() < 0.05
    assert x.grad is not None and x.grad.shape == x.shape


def adapted(model_dir=None):
    """The tiny model in bf16 with LoRA on every linear layer; without model_dir, one initialized as
    Mistral-7B's config says (weights' std 0.02). The tiny test model's weights are ten times larger, to
    learn in a few CPU steps, which makes it chaotic: a 3% change of its weights (e4m3's rounding) turns
    its gradients by 20 degrees, while a model of Mistral's scale barely moves."""
    torch.manual_seed(0)
    if model_dir is None:
        config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=32000, initializer_range=0.02,
                               attn_implementation="sdpa")
        model = MistralForCausalLM(config).to(torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    # init_lora_weights=False: B random too, so that B's gradient and the LoRA term are not zero
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))


def loss_and_lora_grads(model, input_ids):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@needs_cpu_fp8
def test_fp8_base_trains_like_the_bf16_base_and_frees_its_weights():
    batch = torch.randint(0, 32000, (2, 32), generator=torch.Generator().manual_seed(1))
    bf16 = adapted()
    fuse_lora(bf16)
    fp8 = copy.deepcopy(bf16)
    weights_before = sum(p.numel() for p in fp8.parameters())
    assert quantize_frozen_base(fp8) == 2 * 7  # two layers, seven adapted linears each
    frozen_linears = sum(layer.in_features * layer.out_features for layer in fp8.modules() if isinstance(layer, Fp8FrozenLinear))
    assert sum(p.numel() for p in fp8.parameters()) == weights_before - frozen_linears  # the bf16 weights are gone
    assert not any(isinstance(m.base_layer, torch.nn.Linear) for m in fp8.modules() if hasattr(m, "lora_A"))
    base_weights = {k for k in bf16.state_dict() if k.endswith("base_layer.weight")}
    assert len(base_weights) == 14 and set(fp8.state_dict()) == set(bf16.state_dict()) - base_weights  # no FP8 in checkpoints

    loss_bf16, grads_bf16 = loss_and_lora_grads(bf16, batch)
    loss_fp8, grads_fp8 = loss_and_lora_grads(fp8, batch)
    assert abs(loss_fp8 - loss_bf16) / loss_bf16 < 0.001 and loss_fp8 != loss_bf16
    flat = [torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads_bf16, grads_fp8)]
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.99  # 0.997 measured
    assert all(torch.nn.functional.cosine_similarity(grads_bf16[n].flatten(), grads_fp8[n].flatten(), dim=0) > 0.98
               for n in grads_bf16)


@needs_cpu_fp8
def test_q_k_v_and_gate_up_quantize_their_shared_input_once(tiny_model_dir, monkeypatch):
    model = adapted(tiny_model_dir)
    fuse_lora(model)
    quantize_frozen_base(model)
    calls = []
    real = fp8_base.quantize_activation
    monkeypatch.setattr(fp8_base, "quantize_activation", lambda x: calls.append(tuple(x.shape)) or real(x))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
    # per layer: q/k/v's input, o's, gate/up's, down's (4, not 7)
    assert len(calls) == 2 * 4 and calls.count((5, 64)) == 2 * 3 and calls.count((5, 128)) == 2


@needs_cpu_fp8
def test_fp8_layers_chosen_by_name_and_no_quantized_input_outlives_its_fp8_readers(tiny_model_dir, monkeypatch):
    model = adapted(tiny_model_dir)
    fuse_lora(model)
    bf16, all_fp8 = copy.deepcopy(model), copy.deepcopy(model)
    assert quantize_frozen_base(all_fp8) == 2 * 7
    assert quantize_frozen_base(model, ["q_proj", "v_proj", "gate_proj"], "bf16") == 2 * 3
    kinds = {name.rsplit(".", 1)[-1]: type(m.base_layer).__name__ for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert kinds == {"q_proj": "Fp8FrozenLinear", "k_proj": "Linear", "v_proj": "Fp8FrozenLinear", "o_proj": "Linear",
                     "gate_proj": "Fp8FrozenLinear", "up_proj": "Linear", "down_proj": "Linear"}
    calls = []
    real = fp8_base.quantize_activation
    monkeypatch.setattr(fp8_base, "quantize_activation", lambda x: calls.append(tuple(x.shape)) or real(x))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        # per layer: q's input, quantized once for q and v (k, between them, is bf16), and gate's; gate keeps none
        # for up, which is bf16: nothing quantized is left held once the forward is done
        assert calls == [(5, 64), (5, 64)] * 2 and len(input_cache) == 0
        reference, every_layer = (m(input_ids=ids).logits.float() for m in (bf16, all_fp8))
    # fewer layers rounded to e4m3, nearer the bf16 model (0.069 against 0.114 here: the tiny model's large
    # weights make it chaotic)
    assert 0 < (logits - reference).norm() < (every_layer - reference).norm()


def test_fp8_base_settings_are_checked_before_weights_load(tiny_model_dir, tmp_path, monkeypatch):
    from conftest import parse

    from alpaca_sft.train import checks
    from alpaca_sft.train.checks import check_settings
    from alpaca_sft.train.settings import SettingsError

    def problems(*flags):
        with pytest.raises(SettingsError) as err:
            check_settings(*parse("--model_name_or_path", tiny_model_dir, "--output_dir", tmp_path / "out", *flags))
        return str(err.value)

    assert "fp8_base is off" in problems("--fp8_layers", "q_proj")
    assert "fp8_base is off" in problems("--fp8_input_grad", "bf16")
    assert "invalid choice: 'fp16'" in problems("--fp8_base", "true", "--fp8_input_grad", "fp16")
    # a misspelt name would leave its layers in bf16 without a word; checked against the config's own layers, once
    # every other check passes (this CPU's refusal of FP8 lifted)
    monkeypatch.setattr(checks, "fp8_gemm_problem", lambda use_cpu=False: None)
    message = problems("--fp8_base", "true", "--dtype", "bfloat16", "--fp8_layers", "q_proj", "down_pro")
    assert "fp8_layers: down_pro is not an adapted layer of this model; its adapted layers are down_proj, gate_proj" in message


@needs_cpu_fp8
def test_fp8_gap_rebuilds_the_layers_the_run_recorded(tiny_model_dir, tokenizer, tmp_path):
    from alpaca_sft.release.merge import logits_on, quantized_gap
    from alpaca_sft.run_folder.record import BasePrecision

    model = adapted(tiny_model_dir)
    model.save_pretrained(tmp_path / "run")
    texts = ["### Instruction:\nName a color.\n\n### Response:\n"]
    merged = logits_on(model.merge_and_unload(), tokenizer, texts)
    recorded = BasePrecision(dtype="bfloat16", fp8_base=True, fp8_layers=("q_proj", "k_proj", "v_proj", "o_proj"))
    gap = quantized_gap(str(tiny_model_dir), tmp_path / "run", recorded, tokenizer, texts, merged)
    assert gap["layers_in_fp8"] == 2 * 4 and gap["mean_abs_logit_diff"] > 0
    gap = quantized_gap(str(tiny_model_dir), tmp_path / "run", BasePrecision(dtype="bfloat16", fp8_base=True), tokenizer,
                        texts, merged)  # a run recorded before fp8_layers existed: every adapted layer, as it trained
    assert gap["layers_in_fp8"] == 2 * 7


@needs_cpu_fp8
def test_peft_forward_on_an_fp8_base_equals_the_fused_one():
    fused = adapted()
    quantize_frozen_base(fused)
    unfused = copy.deepcopy(fused)
    fuse_lora(fused)
    ids = torch.tensor([[1, 306, 4966, 278, 4086, 29889]])
    with torch.no_grad():
        a, b = fused(input_ids=ids).logits.float(), unfused(input_ids=ids).logits.float()
    # PEFT computes its LoRA branch in fp32, the fused path in bf16: on a bf16 base the two differ by 1.1%
    assert (a - b).norm() / b.norm() < 0.03


@pytest.mark.slow
@needs_cpu_fp8
def test_fp8_recipe_path_trains_validates_and_saves_with_fp8_emulated_on_the_cpu(tiny_model_dir, tmp_path, monkeypatch):
    # Training on an FP8 base is refused without a Hopper GPU (test_cli). With that one check lifted, the
    # CPU emulates the FP8 GEMMs and train_sft.py's whole path runs: the base quantized after the Trainer
    # placed the model, training, evaluations and greedy samples through the FP8 layers, the adapter saved.
    import json

    import yaml
    from conftest import train
    from safetensors.torch import load_file

    from alpaca_sft.train import checks

    monkeypatch.setattr(checks, "fp8_gemm_problem", lambda use_cpu=False: None)
    run = tmp_path / "run"
    trainer = train(tiny_model_dir, run, "--fp8_base", "true", "--dtype", "bfloat16", "--max_steps", 8,
                    "--learning_rate", 1e-2, "--validation_size", 4, "--eval_strategy", "steps", "--eval_steps", 4,
                    "--samples_at_end", 1).trainer
    assert sum(isinstance(m, Fp8FrozenLinear) for m in trainer.model.modules()) == 2 * 7
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["last_loss"] < summary["first_loss"]
    assert [e["step"] for e in summary["validation"]["evaluations"]] == [0, 4, 8]
    assert summary["samples_at_end"]["prompts"] == 1
    assert yaml.safe_load((run / "train_config.yaml").read_text())["fp8_base"] is True  # what eval_compare reads
    adapter = load_file(run / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 2 and all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # B starts at 0
