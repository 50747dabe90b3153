"""Trust: signatures (keys, blocks, checking), the admin policy, `ckpt
verify`, and restore refusing what the policy or a signature refuses
(issue #6)."""
from __future__ import annotations

import base64
import io
import os
import stat
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt import sign
from ckpt.errors import CkptError, Status
from ckpt.image import format as fmt
from ckpt.image import read_image, write_image
from ckpt.restore import policy as pol
from conftest import CKPT_ENV, ROOT, ckpt, wait_lines
from test_image import image_bytes, make_image, page_data, record_maps, seal


# --- keys ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs: {"a": (private path, public path, raw public key), "b": ...}."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("a", "b"):
        priv, pub, _ = sign.keygen(str(d / name), comment=f"test key {name}")
        out[name] = (priv, pub, sign.read_public_key(pub))
    return out


def test_keygen_writes_a_private_and_a_public_file(tmp_path):
    priv, pub, fp = sign.keygen(str(tmp_path / "k"), comment="me@host")
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert open(priv).read().startswith("-----BEGIN PRIVATE KEY-----")
    line = open(pub).read()
    assert line.startswith("ckpt-ed25519 ") and line.rstrip().endswith(" me@host")
    key = sign.read_public_key(pub)
    assert len(key) == 32 and sign.fingerprint(key) == fp
    assert sign.load_signer(priv).public == key
    with pytest.raises(CkptError) as e:
        sign.keygen(str(tmp_path / "k"))
    assert e.value.status == Status.USAGE and "exists" in str(e.value)
    sign.keygen(str(tmp_path / "k"), force=True)
    assert sign.read_public_key(pub) != key


def test_public_key_formats(keys):
    from cryptography.hazmat.primitives import serialization
    signer = sign.load_signer(keys["a"][0])
    raw = signer.public
    pk = signer.key.public_key()
    ssh = pk.public_bytes(serialization.Encoding.OpenSSH,
                          serialization.PublicFormat.OpenSSH).decode()
    pem = pk.public_bytes(serialization.Encoding.PEM,
                          serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    for text in (sign.public_line(raw), sign.public_line(raw, "c o m m e n t"), ssh + " x",
                 pem):
        assert sign.parse_public_key(text) == raw
    for bad in ("", "ckpt-ed25519", "ckpt-ed25519 AAAA", "ckpt-ed25519 !!!!",
                "ssh-rsa AAAAB3NzaC1yc2E", "ssh-ed25519 " + base64.b64encode(b"x" * 51).decode(),
                pem.replace("END PUBLIC", "END PUBLIK"), "hello"):
        with pytest.raises(ValueError):
            sign.parse_public_key(bad)


def test_private_key_errors(tmp_path, keys):
    (tmp_path / "pub-as-priv").write_text(open(keys["a"][1]).read())
    for path, match in ((tmp_path / "nope", "cannot read key"),
                        (tmp_path / "pub-as-priv", "not a private key")):
        with pytest.raises(CkptError) as e:
            sign.load_signer(str(path))
        assert e.value.status == Status.USAGE and match in str(e.value), str(e.value)


# --- signature blocks in the image stream ------------------------------------------

def signed_bytes(*key_paths, image=None) -> bytes:
    image = image or make_image()
    buf = io.BytesIO()
    write_image(buf, image, [page_data(image)])
    data = buf.getvalue()
    trailer = data[-fmt.TRAILER_SIZE:]
    return data + b"".join(sign.load_signer(k)(trailer) for k in key_paths)


def check(data: bytes, **kw) -> list[bytes]:
    img = read_image(io.BytesIO(data))
    return sign.check_signatures(img.extra["trailer"], img.extra["signatures"],
                                 name="img", **kw)


def refused(data: bytes, status=Status.SIGNATURE, match="", **kw) -> str:
    with pytest.raises(CkptError) as e:
        check(data, **kw)
    assert e.value.status == status, str(e.value)
    assert "\n" not in str(e.value) and match in str(e.value), str(e.value)
    return str(e.value)


def test_signed_image_reads_and_verifies(keys):
    a, b = keys["a"][2], keys["b"][2]
    data = signed_bytes(keys["a"][0], keys["b"][0])
    img = read_image(io.BytesIO(data))
    assert [s.body[:32] for s in img.extra["signatures"]] == [a, b]
    assert len(data) == len(image_bytes()) + 2 * (fmt.SIG_HEADER_SIZE + fmt.ED25519_BODY)
    assert check(data) == [a, b]
    from ckpt.image import summarize, to_json
    text = summarize(img)
    assert f"signed by {sign.fingerprint(a)}, {sign.fingerprint(b)}" in text
    assert [x["public_key"] for x in to_json(img)["signatures"]] == [a.hex(), b.hex()]
    assert "- (not signed)" in summarize(read_image(io.BytesIO(image_bytes())))
    assert check(data, required=True, trusted=[b]) == [a, b]
    refused(data, required=True, trusted=[], match="not a trusted key")
    assert check(image_bytes()) == []
    refused(image_bytes(), required=True, trusted=[a], match="the image is not signed")


def test_signatures_do_not_change_the_image(keys):
    plain = read_image(io.BytesIO(image_bytes()))
    signed = read_image(io.BytesIO(signed_bytes(keys["a"][0])))
    assert plain == signed and plain.extra["trailer"] == signed.extra["trailer"]


def test_bad_signature_is_always_refused(keys):
    data = bytearray(signed_bytes(keys["a"][0]))
    data[-1] ^= 1                                       # the signature's last byte
    refused(bytes(data), match="bad signature")
    refused(bytes(data), required=True, trusted=[keys["a"][2]], match="bad signature")
    # a's signature, but b's key in the block: forged
    good = signed_bytes(keys["a"][0])
    block = good[-fmt.ED25519_BODY:]
    forged = good[:-fmt.ED25519_BODY] + keys["b"][2] + block[32:]
    refused(forged, match="bad signature")


def test_signature_of_another_image_is_refused(keys):
    """A valid block moved onto another image (or the image changed and its
    checksums recomputed) no longer verifies."""
    sig = signed_bytes(keys["a"][0])[-(fmt.SIG_HEADER_SIZE + fmt.ED25519_BODY):]
    other = seal(record_maps(), page_data(make_image())[:-1] + b"\x01")
    assert read_image(io.BytesIO(other))
    refused(other + sig, match="bad signature")


def test_unknown_signature_blocks_are_skipped(keys):
    data = image_bytes()
    future = fmt.signature_block(b"\x01" * 200, version=2) + \
        fmt.signature_block(b"\x02" * 33, algorithm=7)
    img = read_image(io.BytesIO(data + future))
    assert [(s.version, s.algorithm) for s in img.extra["signatures"]] == [(2, 1), (1, 7)]
    assert check(data + future) == []
    refused(data + future, required=True, trusted=[keys["a"][2]],
            match="not signed (2 signature block(s) of an unknown kind)")
    signed = signed_bytes(keys["a"][0])
    assert check(signed + future, required=True, trusted=[keys["a"][2]]) == [keys["a"][2]]


@pytest.mark.parametrize("tail, match", [
    (b"CKPT-SI", "is not a signature block"),
    (b"CKPT-SIG\x01\x00\x01\x00", "is not a signature block"),
    (fmt.SIG_HEADER.pack(fmt.SIG_MAGIC, 1, 1, 96) + bytes(95), "truncated in signature block 0"),
    (fmt.signature_block(bytes(95)), "ed25519 body of 95 bytes, expected 96"),
    (fmt.signature_block(bytes(4097), version=9), "exceeds the limit of 4096"),
    (fmt.signature_block(bytes(96)) * 17, "more than 16 signature blocks"),
    (fmt.signature_block(bytes(96)) + b"junk", "after signature block 0 after the trailer"),
])
def test_malformed_signature_sections(tail, match):
    with pytest.raises(CkptError) as e:
        read_image(io.BytesIO(image_bytes() + tail))
    assert e.value.status == Status.CORRUPT_IMAGE and match in str(e.value), str(e.value)


def test_authenticate_runs_before_records_are_decoded():
    """With an authenticate hook, records are decoded only after it
    approved the (checksummed) stream."""
    seen = []

    def refuse(trailer, blocks):
        seen.append((trailer, blocks))
        raise CkptError(Status.SIGNATURE, "no")

    # Records that would fail to decode, correctly sealed.
    bad = seal(record_maps() + [{"type": "socket"}])
    with pytest.raises(CkptError) as e:
        read_image(io.BytesIO(bad), authenticate=refuse)
    assert e.value.status == Status.SIGNATURE and len(seen) == 1
    with pytest.raises(CkptError) as e:
        read_image(io.BytesIO(bad), authenticate=lambda t, b: None)
    assert e.value.status == Status.CORRUPT_IMAGE and "socket" in str(e.value)


# --- policy --------------------------------------------------------------------------

def policy_from(tmp_path, text: str) -> pol.Policy:
    p = tmp_path / "policy.toml"
    p.write_text(text)
    return pol.load_policy(str(p))


def bad_policy(tmp_path, text: str, match: str) -> str:
    with pytest.raises(CkptError) as e:
        policy_from(tmp_path, text)
    msg = str(e.value)
    assert e.value.status == Status.POLICY and "\n" not in msg, msg
    assert match in msg and "refusing all restores" in msg, msg
    return msg


def test_policy_defaults_when_missing(tmp_path, monkeypatch):
    monkeypatch.delenv(pol.ENV, raising=False)
    missing = pol.load_policy(pol.DEFAULT_PATH) if not os.path.exists(pol.DEFAULT_PATH) \
        else pol.Policy(pol.DEFAULT_PATH, False)
    assert missing == pol.Policy(pol.DEFAULT_PATH, False)
    assert (missing.require_signature, missing.trusted_keys, missing.allow_restore_creds,
            missing.max_image_size, missing.allowed_users) == (False, (), True, 0, ("*",))
    assert "default policy" in missing.describe()
    # A file named by CKPT_POLICY must exist: a typo is not "no policy".
    monkeypatch.setenv(pol.ENV, str(tmp_path / "nope.toml"))
    with pytest.raises(CkptError) as e:
        pol.load_policy()
    assert e.value.status == Status.POLICY and "no such file" in str(e.value)


def test_policy_full(tmp_path, keys):
    a, b = keys["a"], keys["b"]
    kdir = tmp_path / "keys.d"
    kdir.mkdir()
    (kdir / "b.pub").write_text(open(b[1]).read())
    (kdir / "README").write_text("not a key")
    p = policy_from(tmp_path, f"""
        # comment
        require_signature = true
        trusted_keys = ["{sign.public_line(a[2], 'inline')}", "keys.d"]
        allow_restore_creds = false
        max_image_size = "2G"
        allowed_users = ["root", 1000, "@adm"]
    """)
    assert p.found and p.require_signature and not p.allow_restore_creds
    assert p.trusted_keys == (a[2], b[2])
    assert p.max_image_size == 2 << 30 and p.allowed_users == ("root", 1000, "@adm")
    for text, size in (("1234", 1234), ('"10 MiB"', 10 << 20), ('"7k"', 7 << 10),
                       ('"3T"', 3 << 40), ("0", 0)):
        assert policy_from(tmp_path, f"max_image_size = {text}").max_image_size == size


@pytest.mark.parametrize("text, match", [
    ("require_signature = yes", "not valid TOML"),
    ("require_signatures = true", "unknown key 'require_signatures'"),
    ("require_signature = 1", "require_signature must be true or false"),
    ('allow_restore_creds = "no"', "allow_restore_creds must be true or false"),
    ("max_image_size = -1", "max_image_size must be"),
    ('max_image_size = "lots"', "max_image_size must be"),
    ("max_image_size = 1.5", "max_image_size must be"),
    ("allowed_users = 'root'", "allowed_users must be a list"),
    ("allowed_users = ['']", "allowed_users must be a list"),
    ("trusted_keys = 'x'", "trusted_keys must be a list of non-empty strings"),
    ("trusted_keys = ['']", "trusted_keys must be a list of non-empty strings"),
    ("trusted_keys = [' ']", "trusted_keys must be a list of non-empty strings"),
    ("trusted_keys = ['ckpt-ed25519 AAAA']", "trusted key 'ckpt-ed25519 AAAA'"),
    ("trusted_keys = ['/nonexistent/k.pub']", "trusted key file /nonexistent/k.pub: no such file"),
    ("require_signature = true", "trusted_keys is empty"),
    ("[section]\nx = 1", "unknown key 'section'"),
])
def test_malformed_policy_refuses_everything(tmp_path, text, match):
    bad_policy(tmp_path, text, match)


def test_unreadable_or_odd_policy_files(tmp_path):
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe = 1")
    (tmp_path / "dir.toml").mkdir()
    for name, match in (("bin.toml", "not UTF-8"), ("dir.toml", "cannot read it")):
        with pytest.raises(CkptError) as e:
            pol.load_policy(str(tmp_path / name))
        assert e.value.status == Status.POLICY and match in str(e.value), str(e.value)


def test_policy_checks(tmp_path):
    me = os.getuid()
    import pwd
    name = pwd.getpwuid(me).pw_name
    import grp
    group = grp.getgrgid(os.getgid()).gr_name
    for users in ([me], [name], ["@" + group], ["*"], [str(me)], ["nobody", me]):
        pol.check_caller(pol.Policy("p", True, allowed_users=tuple(users)))
    for users in ([], [me + 12345], ["no-such-user-here"], ["@no-such-group-here"]):
        with pytest.raises(CkptError) as e:
            pol.check_caller(pol.Policy("p", True, allowed_users=tuple(users)))
        assert e.value.status == Status.POLICY and "allowed_users" in str(e.value)
    p = pol.Policy("p", True, max_image_size=100)
    pol.check_image_size(p, 100, "img")
    with pytest.raises(CkptError) as e:
        pol.check_image_size(p, 101, "img")
    assert e.value.status == Status.POLICY and "max_image_size is 100" in str(e.value)
    pol.check_image_size(pol.Policy("p", False), 10**15, "img")
    with pytest.raises(CkptError) as e:
        pol.check_restore_creds(pol.Policy("p", True, allow_restore_creds=False))
    assert e.value.status == Status.POLICY and "--as-caller" in str(e.value)


# --- end to end: dump --sign, ckpt sign, restore and ./app.ckpt under a policy ------------


def ticker_image(programs, start, image, *extra) -> list[str]:
    """Dump a running ticker (--kill) into image; return the lines it printed."""
    t = start([programs("ticker"), "50"])
    wait_lines(t.stdout_path, 3, target=t)
    r = ckpt("dump", t.pid, "-o", image, "--kill", *extra)
    assert r.returncode == 0, r
    t.wait()
    return t.stdout().splitlines()


def continues(before: list[str], out: str) -> None:
    last = int(before[-1].split()[1])
    ticks = [int(line.split()[1]) for line in out.splitlines()]
    assert ticks and ticks == list(range(last + 1, 50)), out


def one_line(r, status) -> str:
    assert r.returncode == status, r
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: ") and "Traceback" not in r.stderr, r
    return lines[0]


@pytest.fixture
def signed_policy(tmp_path, keys):
    p = tmp_path / "policy.toml"
    p.write_text(f'require_signature = true\ntrusted_keys = ["{keys["a"][1]}"]\n')
    return dict(CKPT_ENV, CKPT_POLICY=str(p))


def test_dump_sign_and_restore_under_a_policy(programs, start, tmp_path, keys, signed_policy):
    image = tmp_path / "app.ckpt"
    before = ticker_image(programs, start, image, "--sign", keys["a"][0])
    assert read_image(image).extra["signatures"][0].body[:32] == keys["a"][2]
    r = ckpt("verify", "--key", keys["a"][1], image, env=signed_policy)
    assert r.returncode == 0 and "(trusted)" in r.stdout, r
    r = ckpt("restore", image, env=signed_policy)
    assert r.returncode == 3, r
    continues(before, r.stdout)


def test_unsigned_refused_then_signed_with_ckpt_sign(programs, start, tmp_path, keys,
                                                     signed_policy):
    image = tmp_path / "app.ckpt"
    before = ticker_image(programs, start, image)
    msg = one_line(ckpt("restore", image, env=signed_policy), Status.SIGNATURE)
    assert "not signed" in msg and "requires a signature" in msg
    one_line(ckpt("verify", image, env=signed_policy), Status.SIGNATURE)
    # b's signature: a valid signature, but not by a trusted key
    assert ckpt("sign", "--key", keys["b"][0], image).returncode == 0
    msg = one_line(ckpt("restore", image, env=signed_policy), Status.SIGNATURE)
    assert "not a trusted key" in msg and sign.fingerprint(keys["b"][2]) in msg
    r = ckpt("sign", "--key", keys["a"][0], image)
    assert r.returncode == 0 and sign.fingerprint(keys["a"][2]) in r.stdout, r
    r = ckpt("sign", "--key", keys["a"][0], image)               # again: replaces a's
    assert len(read_image(image).extra["signatures"]) == 2
    r = ckpt("restore", image, env=signed_policy)
    assert r.returncode == 3, r
    continues(before, r.stdout)


def test_dump_sign_with_a_bad_key_leaves_the_target_alone(programs, start, tmp_path):
    t = start([programs("ticker"), "500"])
    wait_lines(t.stdout_path, 1, target=t)
    msg = one_line(ckpt("dump", t.pid, "-o", tmp_path / "x.ckpt", "--sign",
                        tmp_path / "nokey"), Status.USAGE)
    assert "cannot read key" in msg
    assert t.alive() and not os.path.exists(tmp_path / "x.ckpt")


def test_signed_stream_through_a_pipe(programs, start, tmp_path, keys):
    t = start([programs("ticker"), "500"])
    wait_lines(t.stdout_path, 2, target=t)
    out = tmp_path / "piped.ckpt"
    with open(out, "wb") as f:
        p = subprocess.run([sys.executable, "-m", "ckpt", "dump", str(t.pid),
                            "-o", "-", "--sign", keys["a"][0]], stdout=f,
                           stderr=subprocess.PIPE, env=CKPT_ENV, cwd=ROOT, close_fds=True)
    assert p.returncode == 0, p.stderr
    r = ckpt("verify", "--key", keys["a"][1], out)
    assert r.returncode == 0, r


def test_keygen_cli(tmp_path):
    r = ckpt("keygen", "-o", tmp_path / "k", "-C", "ci")
    assert r.returncode == 0 and "ed25519:" in r.stdout, r
    assert (tmp_path / "k.pub").read_text().startswith("ckpt-ed25519 ")
    one_line(ckpt("keygen", "-o", tmp_path / "k"), Status.USAGE)


def test_restore_path_stays_light_for_unsigned_images(tmp_path):
    """Reading, authenticating and validating an unsigned image under the
    default policy loads no cryptography (nor click, elftools, ptrace)."""
    path = tmp_path / "img.ckpt"
    path.write_bytes(image_bytes())
    code = ("import os, sys\n"
            "from ckpt.restore import load_image, load_policy\n"
            f"fd = os.open({str(path)!r}, os.O_RDONLY)\n"
            "try:\n"
            "    load_image(fd, 'img', load_policy())\n"
            "except Exception as e:\n"
            "    print('error', getattr(e, 'status', e))\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'cryptography', 'click', 'elftools', 'ptrace', 'tomllib'}))\n")
    env = {k: v for k, v in CKPT_ENV.items() if k != "CKPT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True).stdout
    # make_image() is not a restorable process (its pending signal is made up),
    # so validation refuses it; what matters is what got imported on the way.
    assert out.splitlines()[-1] == "[]", out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (binfmt_misc)")
def test_exec_image_under_require_signature(programs, start, tmp_path, keys, signed_policy):
    """./app.ckpt through binfmt_misc: the launcher reads the policy too."""
    from ckpt import binfmt
    unsigned, signed = tmp_path / "unsigned.ckpt", tmp_path / "signed.ckpt"
    ticker_image(programs, start, unsigned)
    before = ticker_image(programs, start, signed, "--sign", keys["a"][0])
    name = f"ckpt-trust-{os.getpid()}"
    r = ckpt("binfmt", "register", "--name", name, "--launcher", tmp_path / "ckpt-launcher")
    assert r.returncode == 0, r
    try:
        refused = subprocess.run([str(unsigned)], capture_output=True, text=True,
                                 env=signed_policy, timeout=30, close_fds=True)
        ok = subprocess.run([str(signed)], capture_output=True, text=True,
                            env=signed_policy, timeout=30, close_fds=True)
    finally:
        ckpt("binfmt", "unregister", "--name", name)
        assert not os.path.exists(f"{binfmt.PROC_DIR}/{name}")
    msg = one_line(refused, Status.SIGNATURE)
    assert "not signed" in msg and refused.stdout == ""
    assert ok.returncode == 3, ok
    continues(before, ok.stdout)


def test_openssh_keys_sign_and_verify(tmp_path):
    """An ssh-keygen style ed25519 key pair works as a ckpt key pair."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "id").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    (tmp_path / "id.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" me@host\n")
    pub = sign.read_public_key(str(tmp_path / "id.pub"))
    assert check(signed_bytes(str(tmp_path / "id")), required=True, trusted=[pub]) == [pub]
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"pw"))
    (tmp_path / "enc").write_bytes(encrypted)
    with pytest.raises(CkptError) as e:
        sign.load_signer(str(tmp_path / "enc"))
    assert e.value.status == Status.USAGE and "encrypted" in str(e.value)

toml_values = st.recursive(
    st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=30)
    | st.sampled_from(["64G", "1 MiB", "*", "@root", "root", "ckpt-ed25519 AAAA",
                       "ssh-ed25519 AAAA", "/nonexistent", "."]),
    lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["require_signature", "trusted_keys",
                                        "allow_restore_creds", "max_image_size",
                                        "allowed_users", "other"]), toml_values, max_size=4),
       st.binary(max_size=40))
def test_property_any_policy_file_loads_or_refuses_cleanly(tmp_path, table, junk):
    """A policy file is either a Policy or one POLICY line, never a crash."""
    import json
    text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
    for data in (text.encode(), junk, text.encode() + junk):
        p = tmp_path / "p.toml"
        p.write_bytes(data)
        try:
            got = pol.load_policy(str(p))
        except CkptError as e:
            assert e.status == Status.POLICY and "\n" not in str(e), str(e)
        else:
            assert isinstance(got, pol.Policy) and got.found
            assert type(got.max_image_size) is int and got.max_image_size >= 0
