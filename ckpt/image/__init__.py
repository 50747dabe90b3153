"""The checkpoint image: its model, format v1, writer, reader and summary."""
from .format import CURRENT_HEADER, MAGIC
from .model import (ADVICE, FD_FLAGS, FILE_KINDS, GENERAL_REGS, RLIM_INFINITY,
                    SPECIAL_NAMES, VMA_KINDS, Creds, Fd, File, GeneralRegs, Header,
                    Image, MMFields, PageRun, Process, Rlimit, SigAction, Thread, Vma)
from .reader import read_image

# The writer (threads, queues) and the summary are not on the restore path:
# loaded on first use, so restore does not pay for them at start-up.
_LAZY = {"write_image": "writer", "summarize": "summary", "to_json": "summary"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ADVICE", "CURRENT_HEADER", "FD_FLAGS", "FILE_KINDS", "GENERAL_REGS", "MAGIC",
    "RLIM_INFINITY", "SPECIAL_NAMES", "VMA_KINDS", "Creds", "Fd", "File",
    "GeneralRegs", "Header", "Image", "MMFields", "PageRun", "Process", "Rlimit",
    "SigAction", "Thread", "Vma", "read_image", "summarize", "to_json", "write_image",
]
