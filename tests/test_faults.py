"""Faults during a run, on the tiny recipe: a kill -9 at several points of a save, a full disk during a save, a
second Ctrl-C during the graceful save, a second run into the same folder, a resume after a clean start, and a
resume with other settings. Each ends with the user's last good result intact and a message that says what
happened."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import NO_VALIDATION, REPO, TINY, parse, train, write_jsonl
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import Trainer

import train_sft
from alpaca_sft.run_folder.layout import LOCK_FILE, RUN_FILES, SEAL, listed
from alpaca_sft.run_folder.lock import OutputDirLock
from alpaca_sft.train.callbacks import GracefulStop

# 6 steps, a checkpoint every 2: the fault strikes checkpoint-4, checkpoint-2 is the last good one.
STEPS = ("--max_steps", 6, "--save_strategy", "steps", "--save_steps", 2, "--logging_steps", 2)


def sealed(output_dir):
    return sorted(p.name for p in output_dir.glob("checkpoint-*") if (p / SEAL).is_file())


def unsealed(output_dir):
    return sorted(p.name for p in output_dir.glob("checkpoint-*") if not (p / SEAL).is_file())


def cli(capsys, *args):
    capsys.readouterr()
    code = train_sft.cli(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out + err


def resumes_from_the_last_complete_checkpoint(model_dir, out, capsys, straight=None):
    """--resume_from_checkpoint true takes checkpoint-2 and sets checkpoint-4 aside; with `straight`, the resumed run
    is trained to the end and must equal the run that never broke (else --preview: the choice, without training)."""
    code, said = cli(capsys, "--config", TINY, "--model_name_or_path", model_dir, "--output_dir", out, *NO_VALIDATION,
                     *STEPS, "--resume_from_checkpoint", "true", *([] if straight else ["--preview", 1]))
    assert code == 0, said
    assert f"resuming from {out / 'checkpoint-2'}; set aside: checkpoint-4.incomplete (" in said
    if straight:
        a, b = load_file(straight / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert train(tiny_model_dir, out, *STEPS).completed
    return out


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_adapter", "inside_optimizer", "before_seal"])
def test_a_kill_during_a_save_leaves_the_last_complete_checkpoint_to_resume(point, tiny_model_dir, straight, tmp_path,
                                                                            capsys):
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "fault_worker.py"), point, "4", "--config", str(TINY),
                             "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
                             *map(str, NO_VALIDATION), *map(str, STEPS)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sealed(out) == ["checkpoint-2"] and unsealed(out) == ["checkpoint-4"]
    code, said = cli(capsys, "--config", TINY, "--model_name_or_path", tiny_model_dir, "--output_dir", out,
                     *NO_VALIDATION, *STEPS, "--resume_from_checkpoint", str(out / "checkpoint-4"))
    assert code == 1 and "checkpoint-4: this checkpoint was not completely written" in said
    assert f"the newest complete one is {out / 'checkpoint-2'}" in said
    resumes_from_the_last_complete_checkpoint(tiny_model_dir, out, capsys, straight if point == "inside_optimizer" else None)


def full_disk_at(ending: str, monkeypatch):
    """safetensors raising what it raises on a full disk (its Rust writer's error, seen on a full tmpfs) when it writes
    a file whose path ends in `ending`."""
    import safetensors.torch
    from safetensors import SafetensorError

    serialize_file = safetensors.torch.serialize_file

    def full_disk(tensors, filename, *args, **kwargs):
        if str(filename).endswith(ending):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return serialize_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "serialize_file", full_disk)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "trainer_state.json"),  # Python's own writes
    Exception("No space left on device (os error 28)"),  # tokenizers' save (Rust)
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save's zip writer
], ids=["python", "tokenizers", "safetensors", "torch"])
def test_a_full_disk_is_known_whichever_library_met_it(error):
    from datasets.exceptions import DatasetGenerationError

    from alpaca_sft.disk import write_failure

    expected = "torch could not write the whole file (" if isinstance(error, RuntimeError) else "No space left on device"
    assert write_failure(error).startswith(expected)
    wrapped = DatasetGenerationError("An error occurred while generating the dataset")  # datasets' cache writer
    wrapped.__cause__ = error
    assert write_failure(wrapped).startswith(expected)
    assert write_failure(OSError(errno.ENOENT, "No such file or directory")) is None
    assert write_failure(Exception("No such file or directory (os error 2)")) is None


def test_a_full_disk_during_a_checkpoint_save_fails_in_one_message_and_resumes(tiny_model_dir, tmp_path, capsys,
                                                                              monkeypatch):
    out = tmp_path / "run"
    full_disk_at("checkpoint-4/adapter_model.safetensors", monkeypatch)  # the first file of a checkpoint
    code, said = cli(capsys, "--config", TINY, "--model_name_or_path", tiny_model_dir, "--output_dir", out,
                     *NO_VALIDATION, *STEPS)
    assert code == 1 and said.count("Traceback") == 0
    assert f"No space left on device while writing {out / 'checkpoint-4'} (" in said
    assert (f"The last complete checkpoint is {out / 'checkpoint-2'}; checkpoint-4 was not completely written and will "
            "be skipped: resume with --resume_from_checkpoint true once there is room on the disk.") in said
    monkeypatch.undo()
    resumes_from_the_last_complete_checkpoint(tiny_model_dir, out, capsys)


def test_a_full_disk_during_the_final_save_leaves_no_adapter_and_resumes_to_it(tiny_model_dir, tmp_path, capsys,
                                                                              monkeypatch):
    from transformers import TrainerState

    from alpaca_sft.train.run import STAGING

    out, steps = tmp_path / "run", ("--max_steps", 2, "--save_strategy", "steps", "--save_steps", 2)
    full_disk_at(f"{STAGING}/adapter_model.safetensors", monkeypatch)

    save_to_json = TrainerState.save_to_json

    def still_full(self, path):  # the disk stays full for the run's record too (a checkpoint's state was written)
        if os.path.dirname(path) == str(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return save_to_json(self, path)

    monkeypatch.setattr(TrainerState, "save_to_json", still_full)
    code, said = cli(capsys, "--config", TINY, "--model_name_or_path", tiny_model_dir, "--output_dir", out,
                     *NO_VALIDATION, *steps)
    assert code == 1 and said.count("Traceback") == 0
    assert f"No space left on device while saving the adapter to {out} (" in said
    assert (f"nothing of it was kept. The last complete checkpoint is {out / 'checkpoint-2'}: resume with "
            "--resume_from_checkpoint true once there is room on the disk.") in said
    assert (f"No space left on device while writing the run's record (trainer_state.json, run_summary.json) in {out} "
            "(") in said
    left = ("adapter_model.safetensors", "adapter_config.json", STAGING, "trainer_state.json", "run_summary.json")
    assert not [name for name in left if (out / name).exists()]
    monkeypatch.undo()
    code, said = cli(capsys, "--config", TINY, "--model_name_or_path", tiny_model_dir, "--output_dir", out,
                     *NO_VALIDATION, *steps, "--resume_from_checkpoint", "true")
    assert code == 0, said
    saved, trained = load_file(out / "adapter_model.safetensors"), load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)


def test_a_second_interrupt_during_the_graceful_save_keeps_the_last_complete_checkpoint(tiny_model_dir, tmp_path,
                                                                                       capsys, monkeypatch):
    first = GracefulStop.on_step_end

    def ctrl_c_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the graceful stop: finish the step, save, exit
        return first(self, args, state, control, **kwargs)

    save_optimizer = Trainer._save_optimizer_and_scheduler

    def ctrl_c_again(self, output_dir):  # the user presses Ctrl-C again while that save is written
        if self.state.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return save_optimizer(self, output_dir)

    monkeypatch.setattr(GracefulStop, "on_step_end", ctrl_c_at_step_3)
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", ctrl_c_again)
    out = tmp_path / "run"
    code, said = cli(capsys, "--config", TINY, "--model_name_or_path", tiny_model_dir, "--output_dir", out,
                     *NO_VALIDATION, *STEPS)
    assert code == 128 + signal.SIGINT
    assert f"interrupted again while saving. The last complete checkpoint is {out / 'checkpoint-2'}" in said
    assert sealed(out) == ["checkpoint-2"] and unsealed(out) == ["checkpoint-3"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()
    code, said = cli(capsys, "--config", TINY, "--model_name_or_path", tiny_model_dir, "--output_dir", out,
                     *NO_VALIDATION, *STEPS, "--resume_from_checkpoint", "true", "--preview", 1)
    assert code == 0 and "set aside: checkpoint-3.incomplete (" in said


def test_one_run_per_output_dir_and_a_dead_holder_is_taken_over(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    holder = OutputDirLock(out).acquire()  # a live run holds the folder
    code, said = cli(capsys, "--config", TINY, "--model_name_or_path", tiny_model_dir, "--output_dir", out,
                     *NO_VALIDATION, "--max_steps", 1)
    assert code == 1 and f"output_dir={out} is in use by another run (pid {os.getpid()}" in said
    assert not (out / "train_config.yaml").exists()
    holder.release()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "2026-12-01 10:00:00"}))
    code, said = cli(capsys, "--config", TINY, "--model_name_or_path", tiny_model_dir, "--output_dir", out,
                     *NO_VALIDATION, "--max_steps", 1)  # its holder died without a word: the lock is free
    assert code == 0 and "its last run (pid 999999 on elsewhere, started 2026-12-01 10:00:00) is gone" in said


def test_a_running_run_holds_its_folder_until_it_ends(tiny_model_dir, tmp_path, monkeypatch):
    from alpaca_sft.run_folder.lock import FolderInUse

    out, refused = tmp_path / "run", []
    step_end = GracefulStop.on_step_end

    def second_run_tries_the_folder(self, args, state, control, **kwargs):
        try:
            OutputDirLock(out).acquire().release()
        except FolderInUse as err:
            refused.append(str(err))
        return step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(GracefulStop, "on_step_end", second_run_tries_the_folder)
    assert train(tiny_model_dir, out, "--max_steps", 2).completed
    assert len(refused) == 2 and "is in use by another run" in refused[0]
    OutputDirLock(out).acquire().release()  # and free once it ended


def test_overwrite_starts_clean_and_a_later_resume_continues_the_new_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_model_dir, out, *STEPS, "--report_to", "tensorboard").completed
    assert sealed(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"] and list((out / "runs").iterdir())
    second = train(tiny_model_dir, out, *STEPS, "--max_steps", 3, "--learning_rate", 1e-3, "--overwrite_output_dir", "true")
    assert second.completed and sealed(out) == ["checkpoint-2", "checkpoint-3"]  # nothing of the first run is left
    assert not (out / "runs").exists()  # its tensorboard logs included
    assert listed(out) == {p.name for p in out.iterdir()} - {LOCK_FILE, RUN_FILES}  # the record is the folder
    adapter = load_file(out / "adapter_model.safetensors")
    shutil.rmtree(out / "checkpoint-3")  # a resume takes the new run's newest checkpoint: checkpoint-2
    code, said = cli(capsys, "--config", TINY, "--model_name_or_path", tiny_model_dir, "--output_dir", out,
                     *NO_VALIDATION, *STEPS, "--max_steps", 3, "--learning_rate", 1e-3, "--resume_from_checkpoint", "true")
    assert code == 0, said
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 3
    assert all(torch.equal(adapter[k], v) for k, v in load_file(out / "adapter_model.safetensors").items())


def test_a_model_folder_as_output_dir_is_refused_before_anything_is_removed(tiny_model_dir, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    for overwrite in ([], ["--overwrite_output_dir", "true"]):
        code, said = cli(capsys, "--config", TINY, "--model_name_or_path", base, "--output_dir", base, *NO_VALIDATION,
                         "--max_steps", 1, *overwrite)
        assert code == 1 and (f"output_dir={base} is a model folder (the base model's own folder): it holds config.json, "
                              "model.safetensors, which no run wrote") in said
        assert "--overwrite_output_dir true" not in said  # no advice that would delete the base
        assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_files_no_run_wrote_are_neither_written_over_nor_removed(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "runs" / "mine").mkdir(parents=True)
    (out / "runs" / "mine" / "events").write_text("the user's own logs")
    (out / "README.md").write_text("the user's notes")
    for overwrite in ([], ["--overwrite_output_dir", "true"]):
        code, said = cli(capsys, "--config", TINY, "--model_name_or_path", tiny_model_dir, "--output_dir", out,
                         *NO_VALIDATION, "--max_steps", 1, *overwrite)
        assert code == 1 and f"output_dir={out} holds README.md, runs/, which no run of train_sft.py wrote" in said
        assert (out / "README.md").read_text() == "the user's notes"
        assert (out / "runs" / "mine" / "events").read_text() == "the user's own logs"
        assert not (out / "train_config.yaml").exists()


def test_a_broken_overwriting_run_leaves_no_record_of_another_adapter(tiny_model_dir, tmp_path):
    import yaml

    out = tmp_path / "run"
    assert train(tiny_model_dir, out, "--max_steps", 2).completed
    broken = train(tiny_model_dir, out, "--max_steps", 20, "--lora_r", 4, "--learning_rate", 1e30, "--max_grad_norm", 0,
                   "--overwrite_output_dir", "true")
    assert broken.exit_code == 1
    assert not (out / "adapter_model.safetensors").exists()  # the r=16 adapter went with its record
    assert yaml.safe_load((out / "train_config.yaml").read_text())["lora_r"] == 4


def test_a_run_from_before_the_record_of_its_files_resumes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_model_dir, out, *STEPS).completed
    (out / RUN_FILES).unlink()  # what the pipeline left before it kept the record, tensorboard's folder among it
    (out / "runs").mkdir()
    code, said = cli(capsys, "--config", TINY, "--model_name_or_path", tiny_model_dir, "--output_dir", out,
                     *NO_VALIDATION, *STEPS, "--resume_from_checkpoint", out / "checkpoint-4")
    assert code == 0, said
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6


def test_a_resume_with_other_settings_is_refused_naming_them(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    data = tmp_path / "data.jsonl"
    data.write_text((REPO / "data" / "alpaca_sample.jsonl").read_text())
    assert train(tiny_model_dir, out, *STEPS, "--dataset_name", data).completed
    common = ["--config", TINY, "--model_name_or_path", tiny_model_dir, "--output_dir", out, *NO_VALIDATION, *STEPS,
              "--dataset_name", data, "--resume_from_checkpoint", out / "checkpoint-4"]
    code, said = cli(capsys, *common, "--learning_rate", 1e-3, "--lora_r", 8)
    assert code == 1 and "would not continue the run it checkpointed" in said
    assert "learning_rate: 0.003 in checkpoint-4, 0.001 now" in said and "lora_r: 16 in checkpoint-4, 8 now" in said
    data.write_text("".join(data.read_text().splitlines(keepends=True)[::-1]))  # the same file name, other order
    code, said = cli(capsys, *common)
    assert code == 1 and "the training examples differ from those checkpoint-4 was trained on" in said
    data.write_text("".join(data.read_text().splitlines(keepends=True)[::-1]))
    seal = out / "checkpoint-4" / "checkpoint.json"  # as sealed before fp8_layers and fp8_input_grad existed:
    sealed = json.loads(seal.read_text())  # those runs had their defaults, which are no change
    del sealed["settings"]["fp8_layers"], sealed["settings"]["fp8_input_grad"]
    seal.write_text(json.dumps(sealed))
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    code, said = cli(capsys, *common)
    assert code == 1 and "checkpoint-4 has no optimizer.pt" in said
    code, said = cli(capsys, *common, "--allow_changed_settings", "true", "--logging_steps", 1)  # logging may change
    assert code == 0, said
    assert json.loads((out / "run_summary.json").read_text())["resumed_with_changes"] == [
        "checkpoint-4 has no optimizer.pt: the run would go on with a fresh optimizer or schedule"]


def test_a_resume_after_a_validation_row_was_edited_is_refused(tiny_model_dir, tmp_path, capsys):
    from alpaca_sft.data.dataset import build_training_data
    from alpaca_sft.models.tokenizer import load_tokenizer

    out, data = tmp_path / "run", tmp_path / "data.jsonl"
    rows = [json.loads(line) for line in (REPO / "data" / "alpaca_sample.jsonl").read_text().splitlines()]
    write_jsonl(data, rows)
    flags = ["--model_name_or_path", tiny_model_dir, "--output_dir", out, "--dataset_name", data, "--validation_size", 4,
             "--eval_strategy", "no", "--eval_on_start", "false", "--samples_at_end", 0, "--max_steps", 2,
             "--save_strategy", "steps", "--save_steps", 2]
    code, said = cli(capsys, "--config", TINY, *flags)
    assert code == 0, said
    script_args, training_args, _ = parse(*flags)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    _, validation, _ = build_training_data(script_args, tokenizer, training_args.max_length, training_args.seed)
    held_out = next(row for row in rows if row["output"] in tokenizer.decode(validation[0]["input_ids"]))
    held_out["output"] += " Edited."  # the same row, still held out: the training examples are as they were
    write_jsonl(data, rows)
    code, said = cli(capsys, "--config", TINY, *flags, "--resume_from_checkpoint", "true")
    assert code == 1 and "the validation examples differ from those checkpoint-2 was validated on" in said
    assert "the training examples differ" not in said
