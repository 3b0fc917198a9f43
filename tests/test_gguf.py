"""tools/base_from_gguf.py and models/gguf.py on a GGUF the test writes itself (tests/gguf_writer.py): the tiny
Gemma 3 model's weights, one of them Q8_0, under the real Mistral-7B vocabulary, so that raw sentencepiece
is the oracle for the tokenizer the conversion builds. The weights come back exactly; the tokenizer encodes
as SentencePiece does; a tokenizer built wrongly, and a file that cannot be converted, are refused. A folder
that holds a model is replaced only on request and only by a checked model; a file without every weight the
model needs is refused by name. (tests/test_gguf_export.py converts the project's own exports of every family.)"""

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys

import gguf
import pytest
import torch
from conftest import REPO
from gguf_writer import Q8_0, write_gemma3_gguf, write_tokenizer_only_gguf
from random_model import mistral_vocabulary, tiny_model
from transformers import AutoModelForCausalLM

from alpaca_sft.models import gguf as gguf_conversion
from alpaca_sft.models.gguf import ConversionError, convert
from alpaca_sft.models.spm import CHECK_TEXTS, build_tokenizer, reference_encode
from alpaca_sft.models.tokenizer import load_tokenizer

# Mistral-7B's special ids; Mistral has no pad, and a Llama 2 GGUF names <unk> as its padding token
MISTRAL_SPECIAL = {"bos": 1, "eos": 2, "unk": 0, "pad": 0, "add_bos": True}
QUANTIZED = "blk.0.ffn_up.weight"  # one tensor in Q8_0, so that dequantization is exercised too
QUANTIZED_HF = "model.layers.0.mlp.up_proj.weight"

ALPACA_LIKE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\nTranslate the sentence into French.\n\n"
    "### Input:\nThe cat is sleeping on the sofa.\n\n### Response:\nLe chat dort sur le canapé.",
    "1. Eat a balanced diet with plenty of fruit and vegetables.\n2. Exercise regularly.\n3. Sleep seven hours.",
    "```python\ndef square(x):\n\treturn x ** 2  # squares\n```\n",
    "SELECT COUNT(*) FROM employees WHERE age > 40;\n\nCREATE TABLE t (name VARCHAR, age INTEGER)",
    " a leading space, two  spaces,   three, and a trailing one ",
    "\n\nnewlines first, then text\r\nwith a carriage return",
    "Привет, мир! Ελληνικά, עברית, العربية, हिन्दी, ไทย",
    "naïve café Zürich façade — “curly quotes” ‘too’ … ½ ° € ™",
    "emoji 🙂🤖👍🏽 and a ZWJ family 👨‍👩‍👧 and math ∑∫√∞",
    "<s> [INST] looks special but is text [/INST] </s>",
)


@pytest.fixture(scope="module")
def vocabulary():
    return mistral_vocabulary()


@pytest.fixture(scope="module")
def tiny_gemma(vocabulary):
    return tiny_model("gemma3", len(vocabulary.pieces), **{f"{k}_token_id": MISTRAL_SPECIAL[k] for k in ("bos", "eos", "pad")})


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tiny_gemma, vocabulary):
    folder = tmp_path_factory.mktemp("gguf")
    return write_gemma3_gguf(folder / "tiny-gemma3.gguf", tiny_gemma, vocabulary, MISTRAL_SPECIAL, quantized=(QUANTIZED,))


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted")
    return folder, convert(gguf_file, folder, dtype="float32")


def expected_weights(tiny_gemma, dtype):
    """The tiny model's weights as the GGUF holds them (the Q8_0 one dequantized), in dtype."""
    weights = {name: w.detach().clone() for name, w in tiny_gemma.state_dict().items()}
    quantized = gguf.quants.quantize(weights[QUANTIZED_HF].numpy(), Q8_0)
    weights[QUANTIZED_HF] = torch.from_numpy(gguf.quants.dequantize(quantized, Q8_0).copy())
    return {name: w.to(dtype) for name, w in weights.items()}


def assert_weights_equal(folder, expected, dtype):
    model = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, its dtype as saved
    state = model.state_dict()
    assert state.keys() == expected.keys()
    different = [name for name in expected if not (state[name].dtype == dtype and torch.equal(state[name], expected[name]))]
    assert not different, f"weights not the GGUF's: {different}"
    return model


def test_conversion_writes_a_folder_that_loads_with_every_weight_of_the_gguf(converted, tiny_gemma, gguf_file):
    folder, report = converted
    expected = expected_weights(tiny_gemma, torch.float32)
    # the Q8_0 tensor went through the dequantizer: close to the original, not equal to it
    original = tiny_gemma.state_dict()[QUANTIZED_HF]
    assert not torch.equal(expected[QUANTIZED_HF], original)
    assert (expected[QUANTIZED_HF] - original).abs().max() < original.abs().max() / 100
    model = assert_weights_equal(folder, expected, torch.float32)

    config, original_config = model.config, tiny_gemma.config
    assert config.model_type == "gemma3_text" and config.tie_word_embeddings
    for key in ("head_dim", "sliding_window", "num_attention_heads", "num_key_value_heads", "hidden_size", "vocab_size"):
        assert getattr(config, key) == getattr(original_config, key), key
    assert config.head_dim * config.num_attention_heads != config.hidden_size  # the case a reader can get wrong
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == MISTRAL_SPECIAL["eos"] and generation["bos_token_id"] == MISTRAL_SPECIAL["bos"]

    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    recorded = json.loads((folder / "conversion.json").read_text())
    assert recorded == report and recorded["sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert recorded["weights_equal_gguf_rounded_to_dtype"] and recorded["probe_top1_agreement_with_gguf"] == 1.0


def test_the_cli_converts_to_bf16_rounding_each_weight_once(gguf_file, tiny_gemma, tmp_path):
    import base_from_gguf

    report = base_from_gguf.main([str(tmp_path / "bf16"), "--gguf", str(gguf_file)])  # bfloat16 by default
    assert report["dtype"] == "bfloat16"
    assert_weights_equal(tmp_path / "bf16", expected_weights(tiny_gemma, torch.bfloat16), torch.bfloat16)


def test_the_tokenizer_written_encodes_as_sentencepiece(converted, vocabulary, sentencepiece_oracle):
    # sentencepiece on Mistral's own tokenizer.model: the builder (models/spm.py), as loaded for training, and
    # the reference encoder it is checked against both agree with it.
    tokenizer = load_tokenizer(str(converted[0]))
    for text in CHECK_TEXTS + ALPACA_LIKE:
        want = sentencepiece_oracle.encode(text)
        assert reference_encode(text, vocabulary) == want, text
        got = tokenizer(text, split_special_tokens=True)["input_ids"]  # sentencepiece never reads "</s>" in text
        assert got == [MISTRAL_SPECIAL["bos"]] + want, text
        assert tokenizer.decode(got[1:]) == sentencepiece_oracle.decode(want), text


def test_a_tokenizer_built_wrongly_is_refused_naming_where_it_differs(gguf_file, tmp_path, monkeypatch):
    # the builder ranking merges backwards (lowest score first); the CLI test below drops the prefix space
    monkeypatch.setattr(gguf_conversion, "build_tokenizer", lambda vocabulary, bos_id, unk_id: build_tokenizer(
        dataclasses.replace(vocabulary, scores=[-score for score in vocabulary.scores]), bos_id, unk_id))
    with pytest.raises(ConversionError) as refused:
        convert(gguf_file, tmp_path / "out", dtype="float32")
    message = str(refused.value)
    assert "does not encode as the GGUF's vocabulary does" in message
    assert repr(CHECK_TEXTS[0][:40]) in message and "first difference at token" in message


@pytest.mark.slow
def test_the_cli_refuses_a_tokenizer_without_its_prefix_space_with_an_error_not_a_traceback(gguf_file, tmp_path):
    script = REPO / "tools" / "base_from_gguf.py"
    run = (f"import dataclasses, runpy, sys; sys.path.insert(0, {str(REPO)!r})\n"
           "from alpaca_sft.models import gguf, spm\n"
           "gguf.build_tokenizer = lambda vocabulary, bos_id, unk_id: spm.build_tokenizer(\n"
           "    dataclasses.replace(vocabulary, add_space_prefix=False), bos_id, unk_id)\n"
           f"sys.argv = [{str(script)!r}, {str(tmp_path / 'out')!r}, '--gguf', {str(gguf_file)!r}]\n"
           f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    error = done.stderr[done.stderr.index("error: "):]
    assert "does not encode as the GGUF's vocabulary does" in error and "first difference at token" in error


def test_a_gguf_whose_tokenizer_is_not_sentencepiece_style_is_refused(tmp_path):
    path = write_tokenizer_only_gguf(tmp_path / "gpt2.gguf", "gpt2", ["a", "b", "<|endoftext|>"], eos=2)
    with pytest.raises(ConversionError, match=r"its tokenizer is 'gpt2' with pre-tokenizer None; converted here"):
        convert(path, tmp_path / "out")


def test_a_gguf_whose_tokenizer_names_no_eos_is_refused(tmp_path):
    path = write_tokenizer_only_gguf(tmp_path / "no-eos.gguf", "llama", ["<unk>", "<s>", "a"])
    with pytest.raises(ConversionError, match="names no EOS token"):
        convert(path, tmp_path / "out")


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="no such file"):
        convert(tmp_path / "absent.gguf", tmp_path / "out")


def test_a_file_that_is_not_a_gguf_is_refused(tmp_path):
    # e.g. a safetensors file given to --gguf by mistake: an error message, not a traceback from the reader
    path = tmp_path / "model.gguf"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ConversionError):
        convert(path, tmp_path / "out")


# --- what the folder may hold, and what the file must hold --------------------------------------------------------
# On the tiny Llama 3 model written by the project's GGUF writer (release/gguf_export.py): its 784-piece vocabulary
# reads in milliseconds, where the Mistral vocabulary above takes seconds per read.

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from random_model import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def llama_gguf(tiny_llama, path, monkeypatch=None, change=None):
    """The tiny Llama as a bf16 GGUF; `change` (a planned tensor -> itself changed, or None: left out) edits the
    tensors the file holds."""
    from alpaca_sft.release import gguf_export

    if change is not None:
        plan = gguf_export.plan_tensors
        monkeypatch.setattr(gguf_export, "plan_tensors", lambda *a: [c for t in plan(*a) if (c := change(t))])
    return gguf_export.export_gguf(tiny_llama, path, "bf16")["path"]


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_folder_that_holds_a_model_is_refused_and_left_as_it_was(gguf_file, tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "a-model")
    before = snapshot(folder)
    with pytest.raises(ConversionError, match="holds a model: pass --overwrite to replace it"):
        convert(gguf_file, folder, dtype="float32")
    assert snapshot(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a-model"]


def test_overwrite_replaces_the_model_whole(tiny_llama, tiny_model_dir, tmp_path):
    path = llama_gguf(tiny_llama, tmp_path / "llama.gguf")
    folder = shutil.copytree(tiny_model_dir, tmp_path / "a-model")  # a Mistral, with a tokenizer.model
    convert(path, folder, dtype="float32", overwrite=True)
    assert not (folder / "tokenizer.model").exists()  # nothing of the earlier model mixed into the new one
    assert AutoModelForCausalLM.from_pretrained(folder).config.model_type == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-model", "llama.gguf"]


def test_a_conversion_that_fails_its_check_leaves_the_earlier_model_and_nothing_else(tiny_llama, tiny_model_dir,
                                                                                    tmp_path, monkeypatch):
    path = llama_gguf(tiny_llama, tmp_path / "llama.gguf")
    folder = shutil.copytree(tiny_model_dir, tmp_path / "a-model")
    before = snapshot(folder)
    build = gguf_conversion.build_byte_level_tokenizer
    monkeypatch.setattr(gguf_conversion, "build_byte_level_tokenizer",  # a builder that loses the merges
                        lambda vocabulary, bos_id: build(dataclasses.replace(vocabulary, merges=[]), bos_id))
    with pytest.raises(ConversionError, match="does not encode as the GGUF's vocabulary does"):
        convert(path, folder, dtype="float32", overwrite=True)
    assert snapshot(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a-model", "llama.gguf"]


def test_a_folder_of_other_files_is_refused_even_with_overwrite(gguf_file, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ConversionError, match="holds files that are not a model"):
        convert(gguf_file, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


@pytest.mark.parametrize("change", [lambda t: None if t.name.startswith("blk.1.") else t,
                                    lambda t: dataclasses.replace(t, name=t.name.replace("blk.1.", "block.1."))],
                         ids=["left-out", "unknown-names"])
def test_a_gguf_without_every_weight_is_refused_naming_what_is_missing(change, tiny_llama, tmp_path, monkeypatch):
    path = llama_gguf(tiny_llama, tmp_path / "partial.gguf", monkeypatch, change)
    with pytest.raises(ConversionError, match=r"weights the llama model needs are not in the file .*"
                                              r"model\.layers\.1\.input_layernorm\.weight"):
        convert(path, tmp_path / "out", dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial.gguf"]


def test_a_dtype_torch_has_but_a_model_folder_is_not_written_in_is_refused(gguf_file, tmp_path):
    for dtype in ("nn", "float8_e4m3fn"):
        with pytest.raises(ConversionError, match=rf"dtype '{dtype}': give one of bfloat16, float32"):
            convert(gguf_file, tmp_path / "out", dtype=dtype)
    assert not (tmp_path / "out").exists()
