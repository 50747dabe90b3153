"""Build the restorer stub and write it as a Python module.

    python restorer-stub/build.py OUT.py      (setup.py calls build(OUT))

Compiles the freestanding C and assembly in this directory with the system
gcc into out/stub.elf (one position-independent image at vaddr 0), checks
it with pyelftools (build time only: the restore path never imports
elftools), and writes OUT.py (ckpt/restore/_stub.py) with:

    BLOB        bytes: the loadable image from vaddr 0 up to the end of the
                file-backed data (bss and the stack are not stored)
    ENTRY       offset of stub_entry(plan) in the image
    RX_SIZE     [0, RX_SIZE) is code + read-only data (mprotect RX); the
                rest of [0, MEM_SIZE) is data, bss and the stack (RW)
    MEM_SIZE    bytes the image occupies when placed (page multiple)
    PLAN_ABI    {"consts": {NAME: value},
                 "structs": {name: {"size": n, "fields": {f: (off, elem, count)}}}}
                from the .plan_abi table abi.c compiles out of plan.h
    SOURCE_HASH sha256 over the sources, flags and this script
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import struct
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
OUT_DIR = HERE / "out"
PAGE = 4096

SOURCES = ("entry.S", "restore.c", "util.c", "abi.c")
HEADERS = ("plan.h", "sys.h", "util.h", "stub.lds")

# Flags, and why:
#  -nostdlib -ffreestanding     no libc, no start files: the stub runs after
#                               the launcher's libc is unmapped
#  -fPIE -static-pie            position independent; any absolute address
#                               would become a dynamic relocation, which
#                               check() below refuses (nothing applies them)
#  -fvisibility=hidden          direct RIP-relative references, no GOT
#  -Os                          small; speed is syscall-bound anyway
#  -fno-stack-protector         no %fs:0x28 canary: fs_base is the
#                               launcher's TLS (soon unmapped), then the
#                               target's
#  -fno-asynchronous-unwind-tables -fno-unwind-tables  no .eh_frame
#  -fcf-protection=none         no endbr64 / CET notes (not needed, smaller)
#  -mgeneral-regs-only          the stub never touches SSE/AVX state, so
#                               nothing depends on the launcher's XSAVE area
#  -fno-tree-loop-distribute-patterns  keep util.c's memcpy/memset loops
#                               from being turned into calls to themselves
#  red zone: kept (no -mno-red-zone). The stub is ordinary user-mode code:
#  the only asynchronous writes below its rsp are signal frames, and the
#  kernel skips the 128-byte red zone when it builds one (our fault
#  handler); there are no interrupts on a user stack.
CFLAGS = [
    "-Os", "-nostdlib", "-ffreestanding", "-fPIE", "-fvisibility=hidden",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables", "-fcf-protection=none", "-mgeneral-regs-only",
    "-fno-tree-loop-distribute-patterns", "-fno-common",
    "-Wall", "-Wextra", "-Werror", "-std=gnu11",
]
LDFLAGS = [
    "-static-pie", "-Wl,-T," + str(HERE / "stub.lds"), "-Wl,--build-id=none",
    "-Wl,-z,norelro", "-Wl,-z,noexecstack", "-Wl,--no-undefined",
]
MAX_MEM = 1 << 20     # the launcher places one region; keep it modest


class BuildError(Exception):
    pass


def source_hash() -> str:
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS, "build.py"):
        h.update(name.encode() + b"\0")
        h.update((HERE / name).read_bytes())
        h.update(b"\0")
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    return h.hexdigest()


def compile_stub() -> pathlib.Path:
    OUT_DIR.mkdir(exist_ok=True)
    elf = OUT_DIR / "stub.elf"
    cmd = [os.environ.get("CC", "gcc"), *CFLAGS, *LDFLAGS, "-o", str(elf),
           *(str(HERE / s) for s in SOURCES)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError("compiling the restorer stub failed:\n"
                         + " ".join(cmd) + "\n" + r.stdout + r.stderr)
    return elf


def _round_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def parse_abi(data: bytes) -> dict:
    ent = struct.Struct("<48sQQQ")
    if len(data) % ent.size:
        raise BuildError(".plan_abi size is not a multiple of its entry")
    consts: dict[str, int] = {}
    structs: dict[str, dict] = {}
    for name, a, b, c in ent.iter_unpack(data):
        name = name.rstrip(b"\0").decode()
        if name.startswith("#"):
            consts[name[1:]] = a
        elif "." in name:
            s, f = name.split(".", 1)
            structs[s]["fields"][f] = (a, b, c)
        else:
            structs[name] = {"size": a, "fields": {}}
    return {"consts": consts, "structs": structs}


def check_and_extract(elf_path: pathlib.Path) -> dict:
    from elftools.elf.constants import P_FLAGS
    from elftools.elf.elffile import ELFFile
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.relocation import RelocationSection

    with open(elf_path, "rb") as f:
        elf = ELFFile(f)
        if elf["e_machine"] != "EM_X86_64" or elf["e_type"] != "ET_DYN":
            raise BuildError("stub is not an x86_64 position-independent ELF")
        for sec in elf.iter_sections():
            if isinstance(sec, RelocationSection) and sec.num_relocations():
                raise BuildError(
                    f"stub has {sec.num_relocations()} relocation(s) in "
                    f"{sec.name}: something takes an absolute address "
                    "(a pointer in initialised data?); nothing would apply it")
            if isinstance(sec, DynamicSection):
                for tag in sec.iter_tags():
                    if tag.entry.d_tag in ("DT_RELA", "DT_REL", "DT_RELR",
                                           "DT_JMPREL", "DT_TEXTREL",
                                           "DT_NEEDED"):
                        raise BuildError(f"stub has dynamic tag {tag.entry.d_tag}")
        loads = []
        for seg in elf.iter_segments():
            t = seg["p_type"]
            if t == "PT_INTERP":
                raise BuildError("stub asks for a dynamic linker")
            if t == "PT_TLS":
                raise BuildError("stub uses thread-local storage")
            if t == "PT_LOAD":
                loads.append((seg["p_vaddr"], seg["p_filesz"], seg["p_memsz"],
                              seg["p_flags"], seg.data()))
        loads.sort()
        if not loads or loads[0][0] != 0:
            raise BuildError("stub image does not start at vaddr 0")
        x = P_FLAGS.PF_X
        w = P_FLAGS.PF_W
        rx = [s for s in loads if s[3] & x]
        if len(rx) != 1 or rx[0] is not loads[0] or rx[0][3] & w:
            raise BuildError("stub must have exactly one R-X segment, first")
        rx_size = _round_up(rx[0][2])
        for vaddr, filesz, memsz, flags, _ in loads[1:]:
            if flags & x or vaddr < rx_size:
                raise BuildError("stub segment layout: RW segments must "
                                 "follow the R-X one on a new page")
        mem_size = _round_up(max(v + m for v, _, m, _, _ in loads))
        if mem_size > MAX_MEM:
            raise BuildError(f"stub needs {mem_size} bytes (> {MAX_MEM})")
        file_end = max(v + fs for v, fs, _, _, _ in loads)
        blob = bytearray(file_end)
        for vaddr, filesz, _, _, data in loads:
            blob[vaddr:vaddr + filesz] = data[:filesz]
        sec = elf.get_section_by_name(".plan_abi")
        if sec is None:
            raise BuildError("stub has no .plan_abi section")
        abi = parse_abi(sec.data())
        entry = elf["e_entry"]
        symtab = elf.get_section_by_name(".symtab")
        sym = symtab.get_symbol_by_name("stub_entry") if symtab else None
        if not sym or sym[0]["st_value"] != entry:
            raise BuildError("ELF entry is not stub_entry")
        if not (0 <= entry < rx[0][1]):
            raise BuildError("entry outside the code")
    return {"BLOB": bytes(blob), "ENTRY": entry, "RX_SIZE": rx_size,
            "MEM_SIZE": mem_size, "PLAN_ABI": abi}


def render(info: dict, digest: str) -> str:
    hexs = info["BLOB"].hex()
    lines = [hexs[i:i + 96] for i in range(0, len(hexs), 96)]
    blob = "\n".join(f'    "{ln}"' for ln in lines)
    return (
        '"""Generated by restorer-stub/build.py: do not edit (gitignored).\n\n'
        "The restorer stub image and the plan ABI extracted from its ELF.\n"
        '"""\n'
        f"SOURCE_HASH = {digest!r}\n"
        f"ENTRY = {info['ENTRY']:#x}\n"
        f"RX_SIZE = {info['RX_SIZE']:#x}\n"
        f"MEM_SIZE = {info['MEM_SIZE']:#x}\n"
        f"PLAN_ABI = {info['PLAN_ABI']!r}\n"
        f"BLOB = bytes.fromhex(\n{blob}\n)\n"
    )


# The native launcher (launcher.c): static, at a fixed address, no libc;
# it embeds the stub blob built above (out/stub.bin via .incbin) and the
# stub's SOURCE_HASH, which restore tickets carry in their key.
LAUNCHER_SOURCES = ("launcher.c", "launcher-start.S", "util.c")
LAUNCHER_CFLAGS = [
    "-Os", "-nostdlib", "-ffreestanding", "-static", "-fno-pie", "-no-pie",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables",
    "-fcf-protection=none", "-mgeneral-regs-only", "-fno-tree-loop-distribute-patterns",
    "-fno-common", "-Wall", "-Wextra", "-Werror", "-std=gnu11",
    "-Wl,--build-id=none", "-Wl,-z,noexecstack", "-Wl,--no-undefined",
]
LAUNCHER_NAME = "ckpt-launcher-native"


def compile_launcher(info: dict, digest: str, out: pathlib.Path) -> None:
    (OUT_DIR / "stub.bin").write_bytes(info["BLOB"])
    (OUT_DIR / "stub_blob.S").write_text(
        '\t.section .rodata\n\t.globl stub_blob\n\t.balign 64\nstub_blob:\n'
        f'\t.incbin "{OUT_DIR / "stub.bin"}"\n'
        '\t.section .note.GNU-stack, "", @progbits\n')
    (OUT_DIR / "stub_info.h").write_text(
        "/* Generated by build.py: the stub the native launcher embeds. */\n"
        f"#define STUB_ENTRY {info['ENTRY']:#x}\n#define STUB_RX_SIZE {info['RX_SIZE']:#x}\n"
        f"#define STUB_MEM_SIZE {info['MEM_SIZE']:#x}ULL\n"
        f"#define STUB_BLOB_SIZE {len(info['BLOB'])}\n"
        f'#define STUB_SOURCE_HASH "{digest}"\n')
    tmp = out.with_name(out.name + ".tmp")
    cmd = [os.environ.get("CC", "gcc"), *LAUNCHER_CFLAGS, f"-I{HERE}", f"-I{OUT_DIR}",
           "-o", str(tmp), *(str(HERE / s) for s in LAUNCHER_SOURCES),
           str(OUT_DIR / "stub_blob.S")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError("compiling the native launcher failed:\n"
                         + " ".join(cmd) + "\n" + r.stdout + r.stderr)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)


def build(out_path) -> None:
    """OUT.py, and the native launcher next to it (ckpt-launcher-native)."""
    out_path = pathlib.Path(out_path)
    digest = source_hash()
    elf = compile_stub()
    info = check_and_extract(elf)
    text = render(info, digest)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out_path)
    compile_launcher(info, digest, out_path.with_name(LAUNCHER_NAME))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python restorer-stub/build.py OUT.py", file=sys.stderr)
        return 2
    try:
        build(argv[1])
    except BuildError as e:
        print(f"restorer-stub/build.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
