"""tools/export_gguf.py and release/gguf_export.py on the tiny random model of each family (tools/random_model.py,
each with its family's tokenizer), read back by two readers that share no code with the writer: transformers' own
GGUF loader, and the project's GGUF-to-folder conversion (models/gguf.py, which rebuilds the tokenizer from the file
and checks it). bf16 gives the source's logits with its weights rounded to bf16, q8_0 with its matrices rounded to
Q8_0 by a rounding written here; the token ids of real Alpaca records are the source tokenizer's; the metadata is
llama.cpp's. A q/k row order or a norm offset left out makes the same comparison fail. Bad input is refused in one
message, and nothing half-written is left."""

import errno
import json
import runpy
import shutil
import stat

import gguf
import jinja2
import pytest
import torch
from conftest import REPO
from random_model import ARCHITECTURES, build_random_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_sft.data.template import render_prompt
from alpaca_sft.models.gguf import convert, gguf_config
from alpaca_sft.release import gguf_export
from alpaca_sft.release.gguf_export import FAMILIES, ExportError, export_gguf, write_modelfile
from alpaca_sft.release.gguf_tokenizer import chat_template

ALPACA = [json.loads(line) for line in (REPO / "data" / "heldout_alpaca.jsonl").read_text(encoding="utf-8").splitlines()[:12]]
TEXTS = [render_prompt(row["instruction"], row["input"]) + row["output"] for row in ALPACA]
CARD = "---\nlicense: cc-by-nc-4.0\nbase_model: google/gemma-3-270m\n---\n\n# a tuned model\n"
# 40 positions: longer than Gemma 3's 8-token window in the tiny model, so its sliding and full layers differ
IDS = torch.randint(0, 700, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def source(arch, tmp_path_factory):
    folder = build_random_model(tmp_path_factory.mktemp(f"source-{arch}"), arch)
    (folder / "README.md").write_text(CARD)  # as eval_compare.py writes the merged model's card
    return folder


@pytest.fixture(scope="module")
def exported(arch, source, tmp_path_factory):
    """The source written as bf16 or q8_0, each once."""
    out, paths = tmp_path_factory.mktemp(f"gguf-{arch}"), {}

    def path(kind):
        if kind not in paths:
            paths[kind] = export_gguf(source, out / f"tiny-{arch}-{kind}.gguf", kind)["path"]
        return paths[kind]
    return path


# Families whose files share every code path with another's in a check that reads a 32k-piece vocabulary (seconds
# per read): q8_0 encodes every family's matrices alike, and Mistral's file is Llama's architecture with Gemma's
# kind of tokenizer; these checks run on the other families.
Q8_0_FAMILIES = ("llama", "qwen2")
CONVERTED_FAMILIES = ("llama", "qwen2", "gemma3")


def q8_0(weight: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q8_0 rounding (ggml-quants.c, quantize_row_q8_0_ref): blocks of 32 along a row, scale max|x|/127
    stored in fp16, each value round(x/scale), halves away from zero."""
    blocks = weight.reshape(-1, 32)
    scale = blocks.abs().amax(1, keepdim=True) / 127
    inverse = torch.where(scale == 0, 0, 1 / scale)
    scaled = blocks * inverse
    return (scaled.sign() * (scaled.abs() + 0.5).floor() * scale.half().float()).reshape(weight.shape)


def source_rounded(source, kind: str):
    """The source model with each weight as the file stores it: bf16 matrices, or Q8_0 ones; vectors (norms,
    biases) in fp32 either way."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2:
                assert weight.shape[1] % 32 == 0, name  # every tiny matrix fills whole Q8_0 blocks
                weight.copy_(weight.to(torch.bfloat16).float() if kind == "bf16" else q8_0(weight))
    return model


def read_back(path):
    """transformers' GGUF loader; a Gemma 3's config completed as llama.cpp reads the file (models/gguf.py's
    gguf_config: the per-layer window pattern and the query scale, which transformers' reader leaves at defaults)."""
    config = gguf_config(path) if "gemma3" in path.name else None
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config,
                                                dtype=torch.float32).eval()


def assert_same_logits(want_model, got_model, atol=1e-4):
    with torch.no_grad():
        want, got = want_model(IDS).logits, got_model(IDS).logits
    gap = (want - got).abs().max().item()
    assert gap <= atol, f"max |logit difference| {gap:.3g} > {atol}"


def test_transformers_reads_back_the_sources_bf16_logits_and_token_ids(arch, source, exported):
    path = exported("bf16")
    assert_same_logits(source_rounded(source, "bf16"), read_back(path))
    if arch == "gemma3":
        # transformers builds a Gemma GGUF's merges from the pieces' order in the file, not from their scores as
        # llama.cpp does (its gguf_tokenizer_mapping.gemma_tokenizer); the tiny model's pieces (Mistral's, shifted)
        # are not in merge order. Its ids are checked through the project's conversion below, which follows llama.cpp.
        return
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = AutoTokenizer.from_pretrained(source)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text[:60]


@pytest.mark.parametrize("arch", Q8_0_FAMILIES, indirect=True)
def test_q8_0_reads_back_as_the_source_rounded_to_q8_0(arch, source, exported):
    back = read_back(exported("q8_0"))
    assert_same_logits(source_rounded(source, "q8_0"), back)
    # the stated bound against the unrounded source, on these random tiny models (logits of magnitude ~6-11)
    assert_same_logits(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval(), back, atol=1.0)


@pytest.mark.parametrize("arch", CONVERTED_FAMILIES, indirect=True)
def test_the_projects_conversion_reads_back_the_model_and_its_tokenizer(arch, source, exported, tmp_path):
    folder = tmp_path / "converted"
    report = convert(exported("bf16"), folder, dtype="float32")
    assert report["probe_top1_agreement_with_gguf"] == 1.0
    assert_same_logits(source_rounded(source, "bf16"), AutoModelForCausalLM.from_pretrained(folder).eval())
    ours, converted = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert converted(text)["input_ids"] == ours(text)["input_ids"], text[:60]


def test_the_metadata_is_what_llama_cpp_reads(arch, source, exported):
    config = AutoModelForCausalLM.from_pretrained(source).config
    tokenizer = AutoTokenizer.from_pretrained(source)
    reader = gguf.GGUFReader(str(exported("bf16")))
    field = lambda key: reader.fields[key].contents() if key in reader.fields else None  # noqa: E731
    name = FAMILIES[config.model_type].arch
    assert field("general.architecture") == name and field("general.name") == f"tiny-{arch}-bf16"
    assert field("general.license") == "cc-by-nc-4.0" and field("general.base_model.0.name") == "google/gemma-3-270m"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for key, want in (("context_length", config.max_position_embeddings), ("block_count", config.num_hidden_layers),
                      ("attention.head_count", config.num_attention_heads), ("attention.key_length", head_dim),
                      ("attention.head_count_kv", config.num_key_value_heads), ("vocab_size", config.vocab_size)):
        assert field(f"{name}.{key}") == want, key
    assert field(f"{name}.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field("tokenizer.ggml.add_bos_token") == (tokenizer.bos_token_id is not None)
    assert field("tokenizer.chat_template") == chat_template(tokenizer.bos_token_id is not None)
    assert field("tokenizer.ggml.model") == ("gpt2" if arch in ("llama", "qwen2") else "llama")
    assert field("tokenizer.ggml.pre") == {"llama": "llama-bpe", "qwen2": "qwen2"}.get(arch, "default")
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (not config.tie_word_embeddings)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    if arch == "gemma3":
        assert field("gemma3.attention.sliding_window") == config.sliding_window
        assert field("gemma3.attention.sliding_window_pattern") == [t == "sliding_attention" for t in config.layer_types]


def test_the_chat_template_and_the_modelfile_are_the_alpaca_prompt(tmp_path):
    instruction, answer = "Name three primary colors.", "Red, yellow, blue."
    chat = [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]
    for adds_bos, bos in ((True, "<s>"), (False, "")):
        template = jinja2.Environment().from_string(chat_template(adds_bos))
        assert template.render(messages=chat[:1], bos_token="<s>", eos_token="</s>") == bos + render_prompt(instruction)
        assert template.render(messages=chat, bos_token="<s>", eos_token="</s>") == \
            bos + render_prompt(instruction) + answer + "</s>"
    modelfile = write_modelfile(tmp_path / "m-q8_0.gguf").read_text()
    assert modelfile.startswith("FROM ./m-q8_0.gguf\n")
    assert f'TEMPLATE """{render_prompt("{{ .Prompt }}")}"""' in modelfile
    for line in ('PARAMETER stop "### Instruction:"', 'PARAMETER stop "### Input:"', 'PARAMETER stop "### Response:"',
                 "PARAMETER temperature 0", "PARAMETER repeat_penalty 1"):
        assert line in modelfile.splitlines()


def test_llama_3_rope_scaling_is_written_as_the_factors_transformers_applies(sources, tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder = shutil.copytree(sources["llama"], tmp_path / "llama-3.1")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (folder / "config.json").write_text(json.dumps(config))
    path = export_gguf(folder, tmp_path / "out.gguf", "bf16")["path"]
    factors = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight").data
    # llama.cpp divides each rotary frequency by its factor: transformers' unscaled frequencies over its scaled ones
    config = AutoConfig.from_pretrained(folder)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    head_dim = config.hidden_size // config.num_attention_heads
    plain = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    assert len(set(factors.round(3))) > 2  # the tiny context puts frequencies on both sides of the smooth band
    assert torch.allclose(torch.from_numpy(factors.copy()), plain / scaled, rtol=1e-5)


# --- a writer without llama.cpp's transforms fails the same comparisons --------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return {arch: build_random_model(tmp_path_factory.mktemp(f"plain-{arch}"), arch) for arch in ("llama", "gemma3")}


@pytest.mark.parametrize("arch, change", [("llama", {"pairs_rotated": False}), ("gemma3", {"norm_offset": 0.0})],
                         ids=["no-qk-row-order", "no-norm-offset"])
def test_leaving_out_a_transform_llama_cpp_needs_fails_the_comparison(arch, change, sources, tmp_path, monkeypatch):
    model_type = "llama" if arch == "llama" else "gemma3_text"
    family = FAMILIES[model_type]
    monkeypatch.setitem(FAMILIES, model_type, gguf_export.Family(**{**family.__dict__, **change}))
    path = export_gguf(sources[arch], tmp_path / "wrong.gguf", "bf16")["path"]
    with pytest.raises(AssertionError, match="max |logit difference|"):
        assert_same_logits(source_rounded(sources[arch], "bf16"), read_back(path), atol=0.1)


# --- bad input ---------------------------------------------------------------------------------------------------

def test_an_adapter_folder_is_refused_with_the_command_that_merges_it(tmp_path):
    adapter = tmp_path / "run"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "build/gemma-3-270m"}))
    with pytest.raises(ExportError, match=r"is a LoRA adapter, not a model: merge it into its base first") as refused:
        export_gguf(adapter, tmp_path / "out.gguf")
    assert f"python eval_compare.py --base build/gemma-3-270m --tuned {adapter}" in str(refused.value)
    assert not (tmp_path / "out.gguf").exists()


def test_a_family_the_writer_does_not_know_is_named(sources, tmp_path):
    folder = shutil.copytree(sources["llama"], tmp_path / "phi3")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="phi3")))
    with pytest.raises(ExportError, match=r"model_type 'phi3' is not a family this writer knows \(mistral, llama"):
        export_gguf(folder, tmp_path / "out.gguf")


def test_an_existing_output_is_refused_unless_overwrite(sources, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"someone's file")
    with pytest.raises(ExportError, match="exists: pass --overwrite"):
        export_gguf(sources["llama"], out, "bf16")
    assert out.read_bytes() == b"someone's file"
    export_gguf(sources["llama"], out, "bf16", overwrite=True)
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "llama"


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_a_write_that_fails_midway_leaves_no_file(failure, sources, tmp_path, monkeypatch):
    written = []

    def fail_on_the_fifth(values, kind):
        written.append(kind)
        if len(written) == 5:
            raise failure
        return encoded(values, kind)

    encoded = gguf_export._encoded
    monkeypatch.setattr(gguf_export, "_encoded", fail_on_the_fifth)
    if isinstance(failure, OSError):
        with pytest.raises(ExportError, match="is full: the partial out.gguf was removed"):
            export_gguf(sources["llama"], tmp_path / "out.gguf", "bf16")
    else:
        with pytest.raises(KeyboardInterrupt):
            export_gguf(sources["llama"], tmp_path / "out.gguf", "bf16")
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_the_format_cannot_express_is_refused(sources, tmp_path):
    # a byte-level BPE split by a regex llama.cpp has no name for (GPT-2's own)
    folder = shutil.copytree(sources["llama"], tmp_path / "gpt2-split")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="splits text in a way this writer cannot name for llama.cpp"):
        export_gguf(folder, tmp_path / "out.gguf")
    # a SentencePiece-style one that lowercases first: llama.cpp would encode "Give" otherwise
    folder = shutil.copytree(sources["gemma3"], tmp_path / "lowercase")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Lowercase"}, spec["normalizer"]]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="cannot be expressed as a SentencePiece-style GGUF vocabulary: 'Give three"):
        export_gguf(folder, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_an_unknown_type_is_refused_by_the_function_and_the_command_line(sources, tmp_path, capsys):
    with pytest.raises(ExportError, match=r"--type q4_0: not a type this writer knows \(bf16, f16, q8_0, q4_k_m"):
        export_gguf(sources["llama"], tmp_path / "out.gguf", "q4_0")
    with pytest.raises(SystemExit) as ended:
        run_cli(str(sources["llama"]), str(tmp_path / "out.gguf"), "--type", "q4_0")
    assert ended.value.code == 2 and "invalid choice: 'q4_0'" in capsys.readouterr().err


def run_cli(*argv):
    import sys

    saved = sys.argv
    sys.argv = [str(REPO / "tools" / "export_gguf.py"), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = saved


def test_the_command_line_says_an_error_in_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit) as ended:  # the script's own exit with the message: no traceback
        run_cli(str(tmp_path / "run"), str(tmp_path / "out.gguf"))
    assert str(ended.value.code).startswith(f"error: {tmp_path / 'run'} is a LoRA adapter, not a model")


def test_k_quants_go_through_the_llama_quantize_the_user_names(sources, tmp_path):
    with pytest.raises(ExportError, match="only llama.cpp's llama-quantize writes: pass its path with --llama_quantize"):
        export_gguf(sources["llama"], tmp_path / "out.gguf", "q4_k_m")
    with pytest.raises(ExportError, match="--llama_quantize /no/such/llama-quantize: no such executable"):
        export_gguf(sources["llama"], tmp_path / "out.gguf", "q4_k_m", llama_quantize="/no/such/llama-quantize")
    # a stand-in that records how it was called and copies its input (the bf16 file) to its output
    stand_in = tmp_path / "bin" / "llama-quantize"
    stand_in.parent.mkdir()
    stand_in.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "bin" / "called"}\ncp "$1" "$2"\n')
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    report = export_gguf(sources["llama"], tmp_path / "out" / "m.gguf", "q4_k_m", llama_quantize=str(stand_in))
    source_file, output, kind = (tmp_path / "bin" / "called").read_text().split()
    assert kind == "Q4_K_M" and output != str(report["path"]) and report["path"].is_file()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m.gguf"]  # the bf16 it quantized is gone


# --- eval_compare.py --gguf ---------------------------------------------------------------------------------------

def test_eval_compare_writes_the_gguf_beside_merged(tiny_model_dir, tmp_path, capsys):
    import eval_compare
    from conftest import write_jsonl

    merged = shutil.copytree(tiny_model_dir, tmp_path / "merged")  # an already merged model, as --tuned takes one
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": "Name the capital of Japan.", "input": ""}])
    eval_compare.main(eval_compare.parse_args([
        "--base", str(tiny_model_dir), "--tuned", str(merged), "--prompts", str(prompts), "--output_dir",
        str(tmp_path / "cmp"), "--max_new_tokens", "4", "--gguf", "q8_0"]))
    name = f"{tiny_model_dir.name}-alpaca-q8_0"
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir() if p.name.startswith(name)) == \
        [f"{name}.Modelfile", f"{name}.gguf"]
    fields = gguf.GGUFReader(str(tmp_path / "cmp" / f"{name}.gguf")).fields
    assert fields["general.name"].contents() == f"{tiny_model_dir.name}-alpaca"
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f"wrote {tmp_path / 'cmp' / name}.gguf" in capsys.readouterr().out
    # a run without --gguf replaces merged/: the files exported from the earlier one go with it, and what a stopped
    # export left is removed before anything reads the folder
    (tmp_path / "cmp" / f".{name}.gguf.partial-99").write_bytes(b"GGUF")
    eval_compare.main(eval_compare.parse_args([
        "--base", str(tiny_model_dir), "--tuned", str(merged), "--prompts", str(prompts), "--output_dir",
        str(tmp_path / "cmp"), "--max_new_tokens", "4"]))
    assert not [p.name for p in (tmp_path / "cmp").iterdir() if "gguf" in p.name or "Modelfile" in p.name]
    with pytest.raises(SystemExit):  # a K-quant without llama-quantize: refused before anything loads
        eval_compare.parse_args(["--base", "b", "--tuned", "t", "--gguf", "q4_k_m"])
    with pytest.raises(SystemExit):  # which of several merged models to export is not guessed
        eval_compare.parse_args(["--base", "b", "--tuned", "t", "u", "--output_dir", "o", "--gguf", "q8_0"])
    assert "--gguf exports one merged model" in capsys.readouterr().err


def test_push_uploads_each_file_into_the_repository(tmp_path, monkeypatch):
    import huggingface_hub

    from alpaca_sft.release.gguf_export import push_files
    from alpaca_sft.release.push import PushError

    uploaded = []

    class Hub:
        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **_):
            if path_in_repo.endswith(".Modelfile"):
                raise OSError("connection reset")
            uploaded.append((path_or_fileobj, path_in_repo, repo_id))

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    files = [tmp_path / "m-q8_0.gguf", tmp_path / "m-q8_0.Modelfile"]
    with pytest.raises(PushError, match=r"upload of .*m-q8_0.Modelfile to me/m failed: connection reset\n"
                                        r"Retry with: hf upload me/m .*m-q8_0.Modelfile m-q8_0.Modelfile"):
        push_files(files, "me/m")
    assert uploaded == [(str(files[0]), "m-q8_0.gguf", "me/m")]
