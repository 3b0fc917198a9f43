"""models/generation.py: batched greedy answers are those of one prompt at a time (fp32), whichever the batching;
rows that are done stop costing; a batch that runs out of memory is split and goes on; the compiled decoding step is
one graph per batch size, which CUDA graphs can replay step after step. kernels/grouped_decode.py."""

import collections

import pytest
import torch
from conftest import REPO, THREE

from alpaca_sft.data.template import render_prompt
from alpaca_sft.eval.prompts import read_prompts
from alpaca_sft.models.generation import COMPILE_PAYS_BACK_AFTER_STEPS, auto_batching, generate
from alpaca_sft.models.loading import load_for_inference
from alpaca_sft.models.tokenizer import load_tokenizer


class EosAt:
    """The tokenizer with another token taken for its EOS: a random model never emits the real one."""

    def __init__(self, tokenizer, eos: int):
        self.tokenizer, self.eos_token_id = tokenizer, eos

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)


def alone(model, tokenizer, prompts, max_new_tokens, eos=None):
    """Each prompt's new token ids from transformers' generate, one prompt at a time, no padding."""
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=eos or tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answers.append(output[0, ids.shape[1] :].tolist())
    return answers


def as_generated(tokenizer, answer, eos):
    """(text, stop, new tokens) of an answer's ids, cut at its first EOS."""
    stopped = eos in answer
    kept = answer[: answer.index(eos)] if stopped else answer
    return tokenizer.decode(kept, skip_special_tokens=True), "eos" if stopped else "length", len(kept) + stopped


def counting_rows(model, *args, **kwargs):
    """generate(model, *args, **kwargs), and the rows its forward passes were given, summed."""
    rows = []
    hook = model.register_forward_pre_hook(lambda module, _, inputs: rows.append(inputs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        return generate(model, *args, **kwargs), sum(rows)
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, tuned_three):
    """The tiny model that has memorized THREE, merged: it answers those and stops, and runs on for others."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tuned_three))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tuned_three))
    return model.merge_and_unload().eval(), tokenizer


@pytest.fixture(scope="module")
def sliding(tokenizer):
    """A tiny random Gemma 3 (sliding-window layers around a full one, one key/value head for four query heads, as
    in Gemma-3-270m; a window of 8 tokens, shorter than its prompts), prompts of many lengths, and an EOS it emits
    in a few answers only: (model, tokenizer, prompts, answers one at a time)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                              sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    prompts = [p.prompt for p in read_prompts(REPO / "data" / "eval_prompts.jsonl")][:6]
    prompts += [p[: len(p) // 4] for p in prompts[:2]]
    answers = alone(model, tokenizer, prompts, 12)
    counts = collections.Counter(token for answer in answers for token in set(answer[1:]))
    eos = counts.most_common(1)[0][0]
    return model, EosAt(tokenizer, eos), prompts, answers


@pytest.mark.parametrize("batching", ["compiled", "refill", "static"])
def test_batched_answers_are_those_of_one_prompt_at_a_time(tuned, batching, capsys):
    # generate() reorders the prompts by length and batches them: in fp32 the greedy answers, and the order they
    # come back in, are those of one prompt at a time; the caller's tokenizer and model are left as they were.
    # "compiled" on a CPU: transformers does not compile there, and that is said once.
    model, tokenizer = tuned
    prompts = [render_prompt(r["instruction"], r["input"]) for r in THREE]
    prompts += [p.prompt for p in read_prompts(REPO / "data" / "eval_prompts.jsonl")][:5]
    expected = [as_generated(tokenizer, a, tokenizer.eos_token_id) for a in alone(model, tokenizer, prompts, 20)]
    side = tokenizer.padding_side
    together = generate(model, tokenizer, prompts, 20, batch_size=3, batching=batching)
    assert [(g.text, g.stop, g.new_tokens) for g in together] == expected
    assert together[0].text == THREE[0]["output"] and together[0].stop == "eos"  # the order is the prompts'
    assert len({g.new_tokens for g in together}) > 3  # rows end at different steps
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 3  # lengths differ: the batches were padded
    assert tokenizer.padding_side == side and model.config._attn_implementation == "sdpa"
    assert all(g.seconds > 0 for g in together)
    assert capsys.readouterr().out.count("did not compile") == (batching == "compiled")


def test_sliding_window_layers_answer_as_one_prompt_at_a_time_and_done_rows_stop_costing(sliding):
    # Rows join and leave a cache of sliding-window and full layers and still answer as alone. A static batch
    # computes its done rows until its longest answer ends; refill lets them go and tops the batch up.
    model, tokenizer, prompts, answers = sliding
    expected = [as_generated(tokenizer, answer, tokenizer.eos_token_id) for answer in answers]
    assert 2 <= sum(stop == "eos" for _, stop, _ in expected) < len(prompts)
    static, static_rows = counting_rows(model, tokenizer, prompts, 12, batch_size=3, batching="static")
    refill, refill_rows = counting_rows(model, tokenizer, prompts, 12, batch_size=3, batching="refill")
    compiled = generate(model, tokenizer, prompts, 12, batch_size=3, batching="compiled")
    assert [(g.text, g.stop, g.new_tokens) for g in refill] == expected
    assert [(g.text, g.stop, g.new_tokens) for g in static] == expected
    assert [(g.text, g.stop, g.new_tokens) for g in compiled] == expected
    assert refill_rows < static_rows


@pytest.mark.parametrize("batching", ["compiled", "refill", "static"])
def test_a_batch_out_of_memory_is_split_and_goes_on(sliding, batching, capsys):
    model, tokenizer, prompts, answers = sliding
    prompts, rows = prompts[:6], []
    expected = [as_generated(tokenizer, answer[:8], tokenizer.eos_token_id) for answer in answers[:6]]

    def out_of_memory_above_two_rows(module, args, kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        if rows[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    hook = model.register_forward_pre_hook(out_of_memory_above_two_rows, with_kwargs=True)
    try:
        together = generate(model, tokenizer, prompts, 8, batch_size=6, batching=batching)
    finally:
        hook.remove()
    assert [(g.text, g.stop, g.new_tokens) for g in together] == expected
    assert capsys.readouterr().out.count("ran out of GPU memory") == 1
    assert rows[0] == 6 and max(rows[1:]) < 6 and max(rows[-5:]) <= 2  # halved until it fits, and stays there


def recording_compile_config(graphs: list, int_inputs: list | None = None):
    """transformers' compile of the decoding step, on a CPU, with a backend that records each graph it is given and,
    into int_inputs, the non-tensor inputs of each call (one backend for every model it is set on: torch compiles
    again for another backend)."""
    from transformers import CompileConfig

    def recording_backend(graph, example_inputs):
        graphs.append(graph)

        def run(*inputs):
            if int_inputs is not None:
                int_inputs.append(tuple(i for i in inputs if not isinstance(i, torch.Tensor)))
            return graph.forward(*inputs)
        return run

    config = CompileConfig(backend=recording_backend, mode=None)
    config._compile_all_devices = True  # transformers' own switch for compiling on a CPU (its tests use it)
    return config


def test_the_compiled_decoding_step_is_one_graph_replayed_every_step_and_every_batch(sliding, capsys):
    # torch.compile as transformers calls it, with a backend that records each graph and each call instead of
    # inductor (CPU; transformers compiles there only when told to). An int input to the step (a count of tokens) would
    # make CUDA graphs record a new graph every step, and a recompile for the second batch (a new cache) another.
    model, tokenizer, prompts, answers = sliding
    graphs, int_inputs = [], []
    model.generation_config.compile_config = recording_compile_config(graphs, int_inputs)
    try:
        compiled = generate(model, tokenizer, prompts, 12, batch_size=4, batching="compiled")  # two batches of 4
    finally:
        model.generation_config.compile_config = None
        del model._compiled_call  # the fixture's model decodes uncompiled again
    assert [(g.text, g.stop, g.new_tokens) for g in compiled] == [as_generated(tokenizer, a, tokenizer.eos_token_id)
                                                                  for a in answers]
    assert len(graphs) == 1 and len(int_inputs) == 2 * 11  # every decoding step of both batches ran the one graph
    assert set(int_inputs) == {()}
    assert "did not compile" not in capsys.readouterr().out


@pytest.mark.parametrize("load", ["for_inference", "trainable"])
def test_the_tuned_model_decodes_with_the_step_compiled_for_its_base(tiny_model_dir, tuned_three, load):
    # eval_compare.py merges the adapter into the base it generated with; peft freezes the weights it loads into, so a
    # base left trainable (the control) has the step compiled again for the tuned model, on a GPU tens of seconds
    import torch._dynamo
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch._dynamo.reset()  # no graph left by another test
    tokenizer = load_tokenizer(str(tuned_three))
    prompts = [render_prompt(r["instruction"], r["input"]) for r in THREE]
    base = (load_for_inference(str(tiny_model_dir), "float32", "cpu") if load == "for_inference"
            else AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    graphs = []
    base.generation_config.compile_config = recording_compile_config(graphs)
    generate(base, tokenizer, prompts, 4, batch_size=3, batching="compiled")
    tuned = PeftModel.from_pretrained(base, str(tuned_three)).merge_and_unload().eval()
    answers = generate(tuned, tokenizer, prompts, 4, batch_size=3, batching="compiled")
    del tuned._compiled_call
    torch._dynamo.reset()
    assert len(graphs) == (1 if load == "for_inference" else 2)
    assert [a.text for a in answers] == [a.text for a in generate(tuned, tokenizer, prompts, 4, batch_size=3)]


def test_auto_batching_compiles_on_a_gpu_only_when_the_decoding_steps_repay_it():
    enough = COMPILE_PAYS_BACK_AFTER_STEPS
    assert auto_batching(1514, 512, 512, "cuda:0")[0] == "compiled"  # 3 batches x 512 steps
    assert auto_batching(414, 512, enough, "cuda:0")[0] == "compiled"
    assert auto_batching(414, 512, enough - 1, "cuda:0")[0] == "static"
    assert auto_batching(1024, 512, enough // 2, "cuda:0")[0] == "compiled"  # two batches of half the steps
    assert auto_batching(14, 512, 128, "cuda:0") == ("static", f"static: 128 decoding steps, fewer than the {enough} "
                                                               "after which compiling the step pays back")
    assert auto_batching(1514, 512, 512, "cpu") == ("static", "static: on cpu the decoding step is not compiled")


def test_a_single_prompt_out_of_memory_is_raised(sliding):
    model, tokenizer, prompts, _ = sliding

    def out_of_memory(module, args, kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    hook = model.register_forward_pre_hook(out_of_memory, with_kwargs=True)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            generate(model, tokenizer, prompts[:2], 4, batch_size=2)
    finally:
        hook.remove()


def test_grouped_decoding_attends_as_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from alpaca_sft.kernels.grouped_decode import grouped_sdpa

    class Attention(torch.nn.Module):
        num_key_value_groups = 4

    torch.manual_seed(0)
    query, key, value = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    mask = torch.arange(10)[None, None, None, :] >= torch.tensor([0, 3, 9])[:, None, None, None]  # left padding
    expected, _ = sdpa_attention_forward(Attention(), query, key, value, mask, scaling=0.25)
    grouped, _ = grouped_sdpa(Attention(), query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(grouped, expected, rtol=0, atol=1e-6)
