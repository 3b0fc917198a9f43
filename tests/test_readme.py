"""The README's CPU commands, run as written (in a copy of the repository, so runs/ and build/
of the checkout are left alone)."""

import re
import shutil
import subprocess

from conftest import REPO


def readme_commands(section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, flags=re.S)
    return [line for block in blocks for line in block.strip().splitlines() if line.startswith("python")]


def test_quickstart_and_tiny_evaluation_run_as_written(tmp_path):
    for item in ("alpaca_sft", "recipes", "data", "accelerate_configs", "train_sft.py", "eval_compare.py"):
        source = REPO / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / item)
    quickstart = readme_commands("Quickstart on a CPU (no downloads)")
    tiny_eval = [c for c in readme_commands("Evaluation") if "build/tiny-mistral" in c]
    assert len(quickstart) == 2 and "--preview" in quickstart[1] and len(tiny_eval) == 1
    for command in quickstart + tiny_eval:
        result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    run = tmp_path / "runs" / "tiny-cpu"
    for name in ("adapter_model.safetensors", "run_summary.json", "train_config.yaml", "preview.jsonl",
                 "comparison/comparison.md", "comparison/merged/model.safetensors"):
        assert (run / name).exists(), name
    assert "| answers that stop by EOS | 0% |" in (run / "comparison" / "comparison.md").read_text()
