"""Image signatures: ed25519 keys, signing, checking.

Key files (`ckpt keygen -o KEY`):
  KEY      the private key: PKCS#8 PEM, unencrypted, mode 0600. OpenSSH
           ed25519 private keys (`ssh-keygen -t ed25519 -N ''`) load too.
  KEY.pub  the public key, one line: `ckpt-ed25519 BASE64 COMMENT`, where
           BASE64 is the raw 32-byte key. `ssh-ed25519 ...` lines and PEM
           (`-----BEGIN PUBLIC KEY-----`) load too.

A signature block (docs/image-format.md, section 7a) holds the public key
and the signature of fmt.signed_message(trailer): the trailer carries the
BLAKE3 digest of everything before it, so the signature covers the image.

Public keys are parsed here without `cryptography`; it is imported only to
make keys, sign, or check a signature that is present or required, so the
restore path stays fast for unsigned images.
"""
from __future__ import annotations

import base64
import binascii
import os
import stat
import struct

import blake3

from .errors import CkptError, Status
from .image import format as fmt

PUB_PREFIX = "ckpt-ed25519"
_SPKI_ED25519 = bytes.fromhex("302a300506032b6570032100")   # DER SubjectPublicKeyInfo head
KEY_SIZE = 32
SIG_SIZE = 64


def fingerprint(pub: bytes) -> str:
    """A short, stable name for a public key in messages."""
    return "ed25519:" + blake3.blake3(pub).hexdigest()[:16]


def public_line(pub: bytes, comment: str = "") -> str:
    return f"{PUB_PREFIX} {base64.b64encode(pub).decode()}" + (f" {comment}" if comment else "")


# --- public keys (no cryptography needed) -------------------------------------

def parse_public_key(text: str) -> bytes:
    """The raw 32-byte key from a ckpt, OpenSSH or PEM public key; ValueError."""
    text = text.strip()
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        lines = text.splitlines()
        if not lines[-1].startswith("-----END PUBLIC KEY-----"):
            raise ValueError("PEM public key without its END line")
        der = _b64("".join(lines[1:-1]))
        if len(der) != len(_SPKI_ED25519) + KEY_SIZE or not der.startswith(_SPKI_ED25519):
            raise ValueError("PEM public key is not an ed25519 key")
        return der[len(_SPKI_ED25519):]
    words = text.split()
    if len(words) >= 2 and words[0] == PUB_PREFIX:
        key = _b64(words[1])
        if len(key) != KEY_SIZE:
            raise ValueError(f"{PUB_PREFIX} key of {len(key)} bytes, expected {KEY_SIZE}")
        return key
    if len(words) >= 2 and words[0] == "ssh-ed25519":
        blob = _b64(words[1])
        try:
            n, = struct.unpack_from(">I", blob, 0)
            kind = blob[4:4 + n]
            m, = struct.unpack_from(">I", blob, 4 + n)
            key = blob[8 + n:8 + n + m]
        except struct.error:
            raise ValueError("truncated ssh-ed25519 key") from None
        if kind != b"ssh-ed25519" or m != KEY_SIZE or len(key) != KEY_SIZE \
                or len(blob) != 8 + n + m:
            raise ValueError("malformed ssh-ed25519 key")
        return key
    raise ValueError(f"not a public key (expected a line '{PUB_PREFIX} BASE64 ...', "
                     "an 'ssh-ed25519 ...' line or a PEM PUBLIC KEY)")


def _b64(s: str) -> bytes:
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError("bad base64") from None


def read_public_key(path: str) -> bytes:
    """Load KEY.pub; CkptError(USAGE) with one line if it can't be."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(64 << 10)
    except OSError as e:
        raise CkptError(Status.USAGE, f"cannot read public key {path}: {e.strerror}") from None
    try:
        return parse_public_key(text)
    except ValueError as e:
        raise CkptError(Status.USAGE, f"{path}: {e}") from None


# --- private keys, signing (cryptography) --------------------------------------

def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise CkptError(Status.SIGNATURE, "signatures need the Python package "
                        "'cryptography', which is not installed") from None
    return ed25519, serialization, InvalidSignature


class Signer:
    """Turns an image trailer into a signature block (writer's `sign=`)."""

    def __init__(self, private_key) -> None:
        _, serialization, _ = _crypto()
        self.key = private_key
        self.public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def __call__(self, trailer: bytes) -> bytes:
        sig = self.key.sign(fmt.signed_message(trailer))
        return fmt.signature_block(self.public + sig)


def load_signer(path: str) -> Signer:
    """Load a private key file; CkptError(USAGE) with one line if it can't be."""
    ed25519, serialization, _ = _crypto()
    try:
        with open(path, "rb") as f:
            data = f.read(64 << 10)
    except OSError as e:
        raise CkptError(Status.USAGE, f"cannot read key {path}: {e.strerror}") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CkptError(Status.USAGE, f"{path}: encrypted private keys are not "
                        "supported") from None
    except Exception as e:      # cryptography's parse errors: ValueError, UnsupportedAlgorithm
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CkptError(Status.USAGE, f"{path}: not a private key ({first})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise CkptError(Status.USAGE, f"{path}: not an ed25519 private key")
    return Signer(key)


def keygen(path: str, *, comment: str = "", force: bool = False) -> tuple[str, str, str]:
    """Write a new key pair to PATH (0600) and PATH.pub; return (path,
    pub path, fingerprint)."""
    ed25519, serialization, _ = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = Signer(key).public
    pub_path = path + ".pub"
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    for p, data, mode in ((path, pem, 0o600),
                          (pub_path, (public_line(pub, comment) + "\n").encode(), 0o644)):
        try:
            fd = os.open(p, flags, mode)
        except FileExistsError:
            raise CkptError(Status.USAGE, f"{p} exists; not overwriting it "
                            "(use --force)") from None
        except OSError as e:
            raise CkptError(Status.OUTPUT, f"cannot create {p}: {e.strerror}") from None
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
        finally:
            os.close(fd)
    return path, pub_path, fingerprint(pub)


def sign_file(image_path: str, key_path: str) -> str:
    """Append (or replace) this key's signature block in a regular image
    file, after checking the whole image. Returns the key's fingerprint."""
    from .image import read_image
    signer = load_signer(key_path)
    try:
        fd = os.open(image_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise CkptError(Status.USAGE, f"cannot open {image_path}: {e.strerror}") from None
    with os.fdopen(fd, "r+b") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CkptError(Status.USAGE, f"{image_path}: can sign only a regular file")
        image = read_image(f, name=image_path)
        trailer = image.extra["trailer"]
        kept = [b for b in image.extra["signatures"] if not _same_key(b, signer.public)]
        if len(kept) >= fmt.MAX_SIGNATURES:
            raise CkptError(Status.USAGE, f"{image_path} already has "
                            f"{len(kept)} signatures, the most an image may have")
        # Verify what we keep: never carry a bad signature along with ours.
        check_signatures(trailer, kept, name=image_path)
        tail = b"".join(fmt.signature_block(b.body, b.version, b.algorithm) for b in kept)
        tail += signer(trailer)
        end = image.pages_offset + image.extra["stored_length"] + fmt.TRAILER_SIZE
        try:
            f.seek(end)
            f.write(tail)
            f.truncate()
            f.flush()
            os.fsync(fd)
        except OSError as e:
            raise CkptError(Status.OUTPUT, f"cannot write {image_path}: {e.strerror}") from None
    return fingerprint(signer.public)


def _known(block) -> bool:
    return (block.version, block.algorithm) == (fmt.SIG_VERSION, fmt.SIG_ED25519)


def _same_key(block, pub: bytes) -> bool:
    return _known(block) and block.body[:KEY_SIZE] == pub


# --- checking ---------------------------------------------------------------------

def signers(blocks) -> list[bytes]:
    """Public keys of the blocks this ckpt understands (not yet verified)."""
    return [b.body[:KEY_SIZE] for b in blocks if _known(b)]


def check_signatures(trailer: bytes, blocks, *, name: str, trusted=(),
                     required: bool = False, why: str = "") -> list[bytes]:
    """Verify every signature block this ckpt understands (a bad one is
    always refused: the image was altered after signing); with `required`,
    at least one must be by a `trusted` key. Returns the keys that signed.
    Raises CkptError(SIGNATURE) with one line. `why` names the rule that
    requires a signature, for the message."""
    known = [b for b in blocks if _known(b)]
    if not known:
        if required:
            extra = f" ({len(blocks)} signature block(s) of an unknown kind)" if blocks else ""
            raise CkptError(Status.SIGNATURE, f"{name}: the image is not signed{extra}, "
                            f"and {why or 'a signature is required'}")
        return []
    ed25519, _, InvalidSignature = _crypto()
    message = fmt.signed_message(trailer)
    good = []
    for i, b in enumerate(known):
        pub, sig = b.body[:KEY_SIZE], b.body[KEY_SIZE:]
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(pub).verify(sig, message)
        except (InvalidSignature, ValueError):
            raise CkptError(Status.SIGNATURE,
                            f"{name}: bad signature (key {fingerprint(pub)}): the image "
                            "was changed after it was signed, or the signature is forged") \
                from None
        good.append(pub)
    if required:
        trusted = set(trusted)
        if not trusted.intersection(good):
            keys = ", ".join(fingerprint(k) for k in good)
            raise CkptError(Status.SIGNATURE,
                            f"{name}: signed by {keys}, not a trusted key, and "
                            f"{why or 'a signature by a trusted key is required'}")
    return good
