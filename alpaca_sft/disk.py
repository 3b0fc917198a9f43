"""A write that failed for want of room (or on a disk that refuses writes), however the library that wrote says so.

Python's own writes raise an OSError carrying the errno. safetensors and tokenizers write in Rust and raise an
Exception (SafetensorError, or a bare Exception) whose message ends in the OS's words and number: "No space left
on device (os error 28)". torch.save's zip writer checks the bytes written and raises a RuntimeError that names
the writer, the errno lost: "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534" (all three
seen on a full tmpfs with the installed versions). datasets wraps the OSError of its cache writer in its own
DatasetGenerationError."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")
TORCH_WRITER = ("inline_container.cc", "PytorchStreamWriter")


def write_failure(err: BaseException | None) -> str | None:
    """What went wrong, in the OS's words, if `err` or an error it was raised from is a failed write; else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return err.strerror or os.strerror(err.errno)
        rust = RUST_IO_ERROR.search(str(err))
        if rust and int(rust.group(1)) in DISK_ERRNOS:
            return os.strerror(int(rust.group(1)))
        if isinstance(err, RuntimeError) and any(writer in str(err) for writer in TORCH_WRITER):
            return f"torch could not write the whole file ({str(err).strip().splitlines()[0]})"
        err = err.__cause__ or err.__context__
    return None


def room_left(path: str | Path) -> str:
    """How much the disk that holds `path` (or its nearest existing parent) has free, for a message."""
    folder = Path(path).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free, unit = shutil.disk_usage(folder).free, "bytes"
    for larger in ("KB", "MB", "GB", "TB"):
        if free < 1024:
            break
        free, unit = free / 1024, larger
    return f"{free} bytes free there" if unit == "bytes" else f"{free:.1f} {unit} free there"
