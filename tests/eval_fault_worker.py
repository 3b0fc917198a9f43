"""eval_compare.py's command line, killed (SIGKILL, as a crash or the OOM killer would) at one point:

    python tests/eval_fault_worker.py POINT <eval_compare.py flags>

inside_merged_save: the merged model's weights half-written, under a temporary name as safetensors writes
them (`.tmpXXXXXX`, renamed when whole); inside_report: comparison.json half-written, wherever it is written."""

import builtins
import io
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import transformers.modeling_utils as modeling_utils  # noqa: E402

import eval_compare  # noqa: E402

point, argv = sys.argv[1], sys.argv[2:]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if point == "inside_merged_save":
    def save_file(tensors, filename, metadata=None):
        (Path(filename).parent / ".tmpX7f3Qa").write_bytes(b"\0" * 4096)
        die()

    modeling_utils.safe_save_file = save_file
elif point == "inside_report":
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and "comparison.json" in str(file):
            handle.write('{"meta": {"base": ')
            handle.flush()
            die()
        return handle

    builtins.open = io.open = open_  # pathlib's write_text opens through io.open
else:
    sys.exit(f"unknown point {point}")

sys.exit(eval_compare.cli(argv))
