"""Data: reading, validation, the Alpaca template, completion-only labels with the real tokenizer."""

import json

import pytest
from conftest import REPO, write_jsonl

from alpaca_sft.data.dataset import build_dataset
from alpaca_sft.data.records import DataError
from alpaca_sft.data.template import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, render_prompt
from alpaca_sft.data.tokenize import IGNORE_INDEX, tokenize

AWKWARD_RESPONSES = [
    "SELECT class FROM table_name_12 WHERE frequency_mhz > 91.5",
    " starts with a space",
    "\nstarts with a newline",
    "  two  spaces inside",
    "def square(x):\n    return x * x",
    "```sql\nSELECT 1\n```",
    "日本語で答えます。",
    "Привет, мир",
    "\ttab first",
    "says </s> and <s> as text",
    "emoji 🙂 and trailing space ",
]


def trained_ids(row):
    return [token for token, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]


def test_template_is_stanfords_text():
    assert render_prompt("Add.", "1 and 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n"
    )
    assert render_prompt("Add.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd.\n\n### Response:\n"
    )
    assert render_prompt("Add.", "  ") == PROMPT_NO_INPUT.format(instruction="Add.")
    assert PROMPT_WITH_INPUT.endswith("### Response:\n")


@pytest.mark.parametrize("with_input", [False, True])
@pytest.mark.parametrize("response", AWKWARD_RESPONSES)
def test_supervised_tokens_are_exactly_response_plus_eos(tokenizer, sentencepiece_oracle, response, with_input):
    prompt = render_prompt("Answer the question.", "some input" if with_input else "")
    (row,), _ = tokenize([{"prompt": prompt, "completion": response, "where": "row 0"}], tokenizer)

    # Independent reference: raw sentencepiece, which never parses "</s>" in text as a control token.
    prompt_ids = sentencepiece_oracle.encode(prompt, add_bos=True)
    full_ids = sentencepiece_oracle.encode(prompt + response, add_bos=True)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert row["input_ids"] == full_ids + [tokenizer.eos_token_id]
    assert row["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert trained_ids(row) == full_ids[len(prompt_ids) :] + [tokenizer.eos_token_id]
    # Exactly one EOS, the last token, and it is supervised.
    assert row["input_ids"].count(tokenizer.eos_token_id) == 1
    assert row["labels"][-1] == tokenizer.eos_token_id
    assert sentencepiece_oracle.decode(row["input_ids"][:-1]) == prompt + response


def test_boundary_that_does_not_split_is_retokenized_not_warned(tokenizer):
    # A prompt ending in a space is the classic trl#980 case: " SELECT" merges into one piece.
    prompt = "### Response: "
    (row,), retokenized = tokenize([{"prompt": prompt, "completion": "SELECT 1", "where": "row 0"}], tokenizer)
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert retokenized == 1
    assert row["input_ids"][: len(prompt_ids)] == prompt_ids  # what inference on the prompt sees
    assert tokenizer.decode(row["input_ids"][len(prompt_ids) : -1]).strip() == "SELECT 1"
    assert tokenizer.decode(row["input_ids"], skip_special_tokens=True) == prompt + "SELECT 1"
    assert row["labels"][-1] == tokenizer.eos_token_id


def test_pad_token_is_never_eos(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def good(i):
    return {"instruction": f"Say {i}.", "input": "" if i % 2 else f"context {i}", "output": f"Answer {i}."}


BAD_ROWS = [
    ("not an object", '["a list"]', "not an object", "expected an object"),
    ("missing instruction", json.dumps({"input": "", "output": "x"}), "missing instruction", "no `instruction`"),
    ("instruction not a string", json.dumps({"instruction": 3, "output": "x"}), "instruction not a string", "is int"),
    ("missing output", json.dumps({"instruction": "x"}), "missing output", "no `output`"),
    ("null output", json.dumps({"instruction": "x", "output": None}), "missing output", "no `output`"),
    ("output not a string", json.dumps({"instruction": "x", "output": ["a"]}), "output not a string", "is list"),
    ("empty output", json.dumps({"instruction": "x", "output": "  "}), "empty output", "`output` is empty"),
    ("input not a string", json.dumps({"instruction": "x", "input": 5, "output": "y"}), "input not a string", "`input` is int"),
    ("unreadable line", '{"instruction": "x", "output": ', "unreadable line", "not valid JSON"),
]


@pytest.mark.parametrize("kind,line,reason,detail", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_each_bad_row_kind_is_named_by_row_and_line(tmp_path, tokenizer, kind, line, reason, detail):
    lines = [json.dumps(good(0)), json.dumps(good(1)), "", line, json.dumps(good(2))]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        build_dataset(str(path), tokenizer)
    message = str(err.value)
    assert "row 2 (line 4)" in message  # the blank line 3 is not a row
    assert detail in message
    assert "drop_invalid_rows" in message

    dataset, report = build_dataset(str(path), tokenizer, drop_invalid_rows=True)
    assert len(dataset) == 3
    assert report.rows_read == 4 and report.rows_kept == 3
    assert report.dropped == {reason: 1} and report.dropped_rows == {reason: ["row 2 (line 4)"]}


def test_one_error_names_every_bad_row(tmp_path, tokenizer):
    records = [good(0), {"instruction": "x"}, good(1), {"instruction": "x", "output": ""}, {"output": "y"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError) as err:
        build_dataset(str(path), tokenizer)
    message = str(err.value)
    assert "3 of 5 rows" in message
    for where in ("row 1 (line 2)", "row 3 (line 4)", "row 4 (line 5)"):
        assert where in message
    _, report = build_dataset(str(path), tokenizer, drop_invalid_rows=True)
    assert report.dropped == {"missing output": 1, "empty output": 1, "missing instruction": 1}


def test_json_array_rows_are_named_by_index(tmp_path, tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([good(0), {"instruction": "x", "output": 7}]))
    with pytest.raises(DataError, match=r"row 1: `output` is int"):
        build_dataset(str(path), tokenizer)


def write_all_formats(tmp_path, records):
    """The same records as every supported source, the Hub layout included."""
    import pandas as pd

    frame = pd.DataFrame(records)
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", records), "json": tmp_path / "d.json"}
    paths["json"].write_text(json.dumps(records, ensure_ascii=False))
    paths["parquet"] = tmp_path / "d.parquet"
    frame.to_parquet(paths["parquet"])
    paths["csv"] = tmp_path / "d.csv"
    frame.to_csv(paths["csv"], index=False)
    # A folder laid out like a Hub dataset repo goes through the same load_dataset(name, split=...)
    # call that "tatsu-lab/alpaca" does.
    hub = tmp_path / "hub-like" / "data"
    hub.mkdir(parents=True)
    frame.to_parquet(hub / "train-00000-of-00001.parquet")
    paths["hub"] = hub.parent
    return paths


def test_every_source_format_gives_the_same_examples(tmp_path, tokenizer):
    records = [good(i) for i in range(6)] + [{"instruction": "Quote", "input": "", "output": 'He said "hi",\nthen left.'}]
    datasets = {}
    for fmt, path in write_all_formats(tmp_path, records).items():
        dataset, report = build_dataset(str(path), tokenizer)
        assert report.rows_read == len(records) and report.rows_kept == len(records), fmt
        datasets[fmt] = dataset.to_dict()
    reference = datasets.pop("jsonl")
    for fmt, data in datasets.items():
        assert data == reference, fmt
    assert len(reference["input_ids"]) == len(records)


def test_missing_file_and_unknown_suffix(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(str(tmp_path / "nope.jsonl"), tokenizer)
    odd = tmp_path / "d.txt"
    odd.write_text("hello")
    with pytest.raises(DataError, match="unsupported data file"):
        build_dataset(str(odd), tokenizer)


def test_overlong_examples_are_dropped_and_counted_never_cut(tmp_path, tokenizer):
    records = [good(0), {"instruction": "Long.", "input": "", "output": "word " * 300}, good(1)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    dataset, report = build_dataset(str(path), tokenizer, max_length=128)
    assert len(dataset) == 2
    assert report.dropped == {"longer than max_length=128": 1}
    (named,) = report.dropped_rows["longer than max_length=128"]
    assert named.startswith("row 1 (line 2): ") and named.endswith(" tokens") and named in report.summary()
    for row in dataset:
        assert row["input_ids"][-1] == tokenizer.eos_token_id
    with pytest.raises(DataError, match=r"1 examples are longer than max_length=128: row 1 \(line 2\) \("):
        build_dataset(str(path), tokenizer, max_length=128, overlong_policy="error")


def test_report_counts_tokens(tokenizer):
    path = REPO / "data" / "alpaca_sample.jsonl"
    dataset, report = build_dataset(str(path), tokenizer)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    trained = sum(sum(label != IGNORE_INDEX for label in labels) for labels in dataset["labels"])
    assert report.rows_read == report.rows_kept == len(dataset) == 24
    assert report.total_tokens == sum(lengths)
    assert report.trained_tokens == trained
    assert report.tokens_per_example["max"] == max(lengths)
    assert "24 rows read, 24 kept" in report.summary()


def test_a_line_that_is_not_utf8_is_a_bad_row_named_by_line(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([json.dumps(good(0)).encode(), b'{"instruction": "caf\xe9", "output": "x"}',
                                 json.dumps(good(1)).encode()]))
    with pytest.raises(DataError, match=r"row 1 \(line 2\): not valid UTF-8 \(byte 0xe9 at column 21\)"):
        build_dataset(str(path), tokenizer)
    dataset, report = build_dataset(str(path), tokenizer, drop_invalid_rows=True)
    assert len(dataset) == 2 and report.dropped == {"unreadable line": 1}


def test_a_byte_order_mark_is_accepted_in_every_format(tmp_path, tokenizer):
    records = [good(i) for i in range(3)]
    for fmt, path in write_all_formats(tmp_path, records).items():
        if fmt in ("parquet", "hub"):
            continue  # binary formats: no text encoding
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        dataset, report = build_dataset(str(path), tokenizer)  # strict: a lost or broken first row would fail
        assert report.rows_kept == 3 and len(dataset) == 3, fmt


@pytest.mark.parametrize("name,content,message", [
    ("d.json", json.dumps({"instruction": "x", "output": "y"}), "holds one JSON object (keys: instruction, output), not a list"),
    ("d.json", json.dumps("text"), "holds a JSON str, not a list of records"),
    ("d.csv", "instruction,answer\nSay hi,hi\nSay yo,yo\n", "has no `output` column (its columns: answer, instruction)"),
    ("d.json", json.dumps({"instruction": "x", "hunter2": "y"}), "holds one JSON object (keys: instruction, 1 other), not"),
])
def test_a_problem_of_the_whole_file_is_reported_once(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        build_dataset(str(path), tokenizer, drop_invalid_rows=True)
    assert message in str(err.value) and "row" not in str(err.value)


def test_a_private_file_given_as_data_is_neither_quoted_nor_left_in_the_cache(tmp_path, tokenizer, monkeypatch):
    import datasets

    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    secrets = ("s3cr3tSALT", "h4shOfThePassword", "AnotherSecret")
    private = tmp_path / "shadow"  # a password file, named as data through a link
    private.write_text(f"admin:$6${secrets[0]}${secrets[1]}:19000:0:99999:7:::\nbob:$6${secrets[2]}$x:19000:0:99999:7:::\n")
    private.chmod(0o600)
    (tmp_path / "data.csv").symlink_to(private)
    with pytest.raises(DataError) as err:
        build_dataset(str(tmp_path / "data.csv"), tokenizer)
    assert "has no `instruction` or `output` column (its columns: 1 other)" in str(err.value)
    assert not any(secret in str(err.value) for secret in secrets), err.value
    good = tmp_path / "good.csv"  # a private file that is data: read, and no copy of it stays in the cache
    good.write_text(f"instruction,output\nSay it,{secrets[2]}\n")
    good.chmod(0o600)
    assert len(build_dataset(str(good), tokenizer)[0]) == 1
    copies = [f for f in cache.rglob("*") if f.is_file() and any(s.encode() in f.read_bytes() for s in secrets)]
    assert not copies


def test_a_url_is_refused_with_what_to_do(tokenizer):
    with pytest.raises(DataError, match="URLs are not read; download the file"):
        build_dataset("https://example.com/alpaca_data.json", tokenizer)


def test_duplicates_are_counted_and_kept(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [good(0), good(1), good(0), good(0)])
    dataset, report = build_dataset(str(path), tokenizer)
    assert len(dataset) == 4 and report.duplicates == 2 and "2 duplicates kept" in report.summary()
