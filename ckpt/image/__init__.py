"""The checkpoint image: its model, format v1, writer, reader and summary."""
from .format import CURRENT_HEADER, MAGIC
from .model import (ADVICE, FD_FLAGS, FILE_KINDS, GENERAL_REGS, RLIM_INFINITY,
                    SPECIAL_NAMES, VMA_KINDS, Creds, Fd, File, GeneralRegs, Header,
                    Image, MMFields, PageRun, Process, Rlimit, SigAction, Thread, Vma)
from .reader import read_image
from .summary import summarize, to_json
from .writer import write_image

__all__ = [
    "ADVICE", "CURRENT_HEADER", "FD_FLAGS", "FILE_KINDS", "GENERAL_REGS", "MAGIC",
    "RLIM_INFINITY", "SPECIAL_NAMES", "VMA_KINDS", "Creds", "Fd", "File",
    "GeneralRegs", "Header", "Image", "MMFields", "PageRun", "Process", "Rlimit",
    "SigAction", "Thread", "Vma", "read_image", "summarize", "to_json", "write_image",
]
