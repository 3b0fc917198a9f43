"""The validation split, the validation loss and the stop metric during training, the greedy answers
at the end, and where all of it lands (run_summary.json, the console, tensorboard, the model card)."""

import json

import pytest
import torch
from datasets import Dataset

from conftest import NO_VALIDATION, THREE, parse, train, write_jsonl

from alpaca_sft.data.dataset import build_dataset
from alpaca_sft.data.records import DataError
from alpaca_sft.data.split import hold_out, overlap, split_validation
from alpaca_sft.train.checks import check_settings
from alpaca_sft.train.settings import SettingsError


def rows(*contents):
    return Dataset.from_list([{"input_ids": list(c), "labels": list(c)} for c in contents])


def test_hold_out_keeps_copies_together_and_never_in_training():
    data = rows(*[[i] for i in range(20)], [3], [3], [7])  # examples 3 and 7 have copies
    for seed in range(10):
        train, validation = hold_out(data, 5, seed)
        assert overlap(train, validation) == 0
        assert len(train) + len(validation) == len(data) and 5 <= len(validation) <= 7
        held = {tuple(r) for r in validation["input_ids"]}
        assert ((3,) in held) == (validation["input_ids"].count([3]) == 3)
    assert hold_out(data, 5, 1)[1]["input_ids"] == hold_out(data, 5, 1)[1]["input_ids"]  # the seed decides
    assert hold_out(data, 5, 1)[1]["input_ids"] != hold_out(data, 5, 2)[1]["input_ids"]
    assert len(hold_out(rows(*[[i] for i in range(200)]), 0.05, 0)[1]) == 10  # below 1: a fraction
    with pytest.raises(DataError, match="leaving none to train on"):
        hold_out(data, len(data), 0)


def test_a_validation_file_is_used_as_it_is_and_its_overlap_reported(tmp_path, tokenizer):
    train_file = write_jsonl(tmp_path / "train.jsonl", THREE)
    validation_file = write_jsonl(tmp_path / "validation.jsonl", THREE[1:] + [{"instruction": "Say hi.", "output": "Hi"}])
    dataset, report = build_dataset(str(train_file), tokenizer)
    train_data, validation = split_validation(dataset, report, size=0, seed=0, file=str(validation_file),
                                              build=lambda source: build_dataset(source, tokenizer))
    assert len(train_data) == 3 and len(validation) == 3
    assert report.validation["also_in_training"] == 2
    assert "validation: 3 examples" in report.summary() and "2 of them also in training" in report.summary()


@pytest.mark.parametrize("flags, message", [
    (["--validation_size", 4, "--validation_file", "data/alpaca_sample.jsonl"], "pick one"),
    (["--validation_size", 2.5], "a whole number of examples"),
    (["--validation_size", 0, "--validation_file", "missing.jsonl"], "no such"),
])
def test_validation_settings_that_cannot_work_are_refused_before_loading(flags, message, tiny_model_dir, tmp_path):
    with pytest.raises(SettingsError, match=message):
        check_settings(*parse("--model_name_or_path", tiny_model_dir, "--output_dir", tmp_path / "run", *flags))


def test_validation_size_0_alone_turns_validation_off(tmp_path):
    from alpaca_sft.train.checks import apply_pipeline_settings

    script_args, training_args, _ = parse("--output_dir", tmp_path / "run", "--validation_size", 0)
    assert training_args.eval_strategy != "no" and training_args.eval_on_start and script_args.samples_at_end  # the recipe's
    apply_pipeline_settings(script_args, training_args)
    assert training_args.eval_strategy == "no" and not training_args.eval_on_start and script_args.samples_at_end == 0


def validating_trainer(model_dir, adapter, data_file, tmp_path, *flags):
    """The trainer train_sft.py builds, with a trained adapter's weights loaded into it, to evaluate them."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from alpaca_sft.models.tokenizer import load_tokenizer
    from alpaca_sft.train.run import build_trainer
    from alpaca_sft.train.checks import apply_pipeline_settings

    script_args, training_args, model_args = parse("--model_name_or_path", model_dir, "--output_dir", tmp_path / "eval",
                                                    "--dataset_name", data_file, "--report_to", "none", *NO_VALIDATION, *flags)
    apply_pipeline_settings(script_args, training_args)
    tokenizer = load_tokenizer(str(model_dir))
    validation, _ = build_dataset(str(data_file), tokenizer)
    trainer = build_trainer(script_args, training_args, model_args, tokenizer, validation, validation)
    if adapter is not None:
        set_peft_model_state_dict(trainer.model, load_file(adapter / "adapter_model.safetensors"))
    return trainer, validation, tokenizer


def reference_metrics(model, validation, eos):
    """Loss and stop metric the slow way: every example alone, full logits, softmax at its end."""
    nll, tokens, top1, prob = 0.0, 0, [], []
    model.eval()
    with torch.no_grad():
        for row in validation:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1].float()
            log_probs = logits.log_softmax(-1)
            supervised = labels != -100
            nll -= log_probs[supervised].gather(1, labels[supervised, None]).sum().item()
            tokens += int(supervised.sum())
            end = (labels == eos).nonzero()[0, 0]
            top1.append(float(logits[end].argmax() == eos))
            prob.append(log_probs[end, eos].exp().item())
    return {"eval_loss": nll / tokens, "eval_eos_top1": sum(top1) / len(top1), "eval_eos_prob": sum(prob) / len(prob)}


@pytest.mark.parametrize("packed", [True, False])
def test_validation_loss_and_stop_metric_are_exact_packed_or_not(packed, tiny_model_dir, tuned_three, tmp_path):
    data = write_jsonl(tmp_path / "three.jsonl", THREE)
    trainer, validation, tokenizer = validating_trainer(
        tiny_model_dir, tuned_three, data, tmp_path, "--eval_packing", str(packed).lower(), "--per_device_eval_batch_size", 2)
    metrics = trainer.evaluate()
    expected = reference_metrics(trainer.model, validation, tokenizer.eos_token_id)
    assert metrics["eval_response_ends"] == 3
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_stop_metric_is_near_zero_untuned_and_high_once_tuned(tiny_model_dir, tuned_three, tmp_path):
    data = write_jsonl(tmp_path / "three.jsonl", THREE)
    untuned = validating_trainer(tiny_model_dir, None, data, tmp_path)[0].evaluate()
    tuned = validating_trainer(tiny_model_dir, tuned_three, data, tmp_path)[0].evaluate()
    assert untuned["eval_eos_top1"] == 0 and untuned["eval_eos_prob"] < 0.01
    assert tuned["eval_eos_top1"] == 1 and tuned["eval_eos_prob"] > 0.5


@pytest.mark.slow
def test_validation_lands_in_the_console_the_summary_tensorboard_and_the_card(tiny_model_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from alpaca_sft.release.card import model_card
    from alpaca_sft.run_folder.record import RunRecord

    run = tmp_path / "run"
    train(tiny_model_dir, run, "--max_steps", 10, "--validation_size", 4, "--eval_strategy", "steps", "--eval_steps", 5,
          "--eval_on_start", "true", "--report_to", "tensorboard", "--samples_at_end", 2, "--sample_max_new_tokens", 8)
    console = capsys.readouterr().out
    evals = [line for line in console.splitlines() if line.startswith("eval at step")]
    assert [line.split(" |")[0] for line in evals] == ["eval at step 0", "eval at step 5", "eval at step 10"]
    assert "EOS top-1 at response ends" in evals[0] and "greedy answers to 2 validation prompts" in console

    summary = json.loads((run / "run_summary.json").read_text())
    evaluations = summary["validation"]["evaluations"]
    assert [e["step"] for e in evaluations] == [0, 5, 10]
    assert summary["data"]["validation"]["examples"] == 4 and summary["data"]["validation"]["also_in_training"] == 0
    samples = summary["samples_at_end"]
    assert samples["prompts"] == 2 and len(samples["answers"]) == 2
    assert all(a["new_tokens"] <= 8 and a["stop"] in ("eos", "length") for a in samples["answers"])

    (event_file,) = run.glob("runs/*/events.out.tfevents.*")  # transformers' default: output_dir/runs/<date_host>
    events = EventAccumulator(str(event_file.parent)).Reload()
    scalars = events.Tags()["scalars"]
    assert {"eval/loss", "eval/eos_top1", "eval/eos_prob", "train/loss"} <= set(scalars)
    assert [e.value for e in events.Scalars("eval/eos_prob")] == pytest.approx([e["eos_prob"] for e in evaluations])

    card = str(model_card("base", RunRecord.read(run), {}, "prompts.jsonl", "m"))
    assert "stop metric where validation responses end" in card and "greedy answers to 2 validation prompts" in card
