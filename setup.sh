#!/bin/sh
# Set up ckpt on a fresh Debian machine (as root) and run it:
#   ./setup.sh demo    install, then dump/kill/restore a small program
#   ./setup.sh test    install, then run the whole test suite
# Idempotent: a second run reuses what the first installed.
set -eu
cd "$(dirname "$0")"

# Debian's python (not a pyenv shim under a mode-700 /root), so the
# launcher and non-root tests can run it; gcc builds the restorer stub.
need=""
command -v gcc >/dev/null 2>&1 || need="$need gcc libc6-dev"
[ -x /usr/bin/python3 ] || need="$need python3"
/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need="$need python3-venv"
# The suite restores a real JVM (issue #4); without a JDK that test would skip.
[ "${1:-}" = test ] && ! command -v javac >/dev/null 2>&1 && need="$need default-jdk-headless"
if [ -n "$need" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

case "${1:-}" in
    demo) exec .venv/bin/ckpt demo ;;
    test) exec .venv/bin/python -m pytest -q tests ;;
    *) echo "usage: ./setup.sh demo|test" >&2; exit 2 ;;
esac
