"""GNU build-id of an ELF file, from its PT_NOTE segments.

Both the dumper and the restore path need it; the restore path must start in
milliseconds, so this reads the few bytes it needs with struct instead of
importing pyelftools (~40 ms).
"""
from __future__ import annotations

import os
import struct

NT_GNU_BUILD_ID = 3
PT_NOTE = 4
MAX_NOTES = 64 * 1024


def build_id(fd: int) -> bytes:
    """The build-id of the 64-bit little-endian ELF open at fd, or b""."""
    ehdr = os.pread(fd, 64, 0)
    if len(ehdr) < 64 or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
        return b""
    phoff, = struct.unpack_from("<Q", ehdr, 32)
    phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
    if phentsize < 56 or phnum > 256:
        return b""
    phdrs = os.pread(fd, phentsize * phnum, phoff)
    for i in range(len(phdrs) // phentsize):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", phdrs, i * phentsize)
        if p_type == PT_NOTE and p_filesz <= MAX_NOTES:
            found = _find_note(os.pread(fd, p_filesz, p_offset))
            if found:
                return found
    return b""


def _find_note(notes: bytes) -> bytes:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name_end = pos + 12 + ((namesz + 3) & ~3)
        desc_end = name_end + ((descsz + 3) & ~3)
        if desc_end > len(notes):
            return b""
        if ntype == NT_GNU_BUILD_ID and notes[pos + 12:pos + 12 + namesz] == b"GNU\0":
            return notes[name_end:name_end + descsz]
        pos = desc_end
    return b""
