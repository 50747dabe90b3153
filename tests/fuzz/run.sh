#!/bin/sh
# Fuzz the image reader and validator (tests/fuzz/fuzz_image.py) with atheris.
#
#   tests/fuzz/run.sh [SECONDS]        fuzz for SECONDS (default 3600: an hour)
#   tests/fuzz/run.sh --coverage       line coverage the corpus so far reaches
#
# The corpus lives in tests/fuzz/work/corpus (kept between runs), crashes in
# tests/fuzz/work/crash-*. PYTHON picks the interpreter (default .venv's).
set -eu
cd "$(dirname "$0")/../.."
py=${PYTHON:-.venv/bin/python}
work=tests/fuzz/work
mkdir -p "$work/corpus"
if [ "${1:-}" = "--coverage" ]; then
    "$py" -c 'import coverage' 2>/dev/null || "$py" -m pip install -q coverage
    "$py" -m coverage run --data-file="$work/.coverage" --branch \
        --include='ckpt/image/*,ckpt/sign.py' tests/fuzz/fuzz_image.py --replay "$work/corpus"
    exec "$py" -m coverage report --data-file="$work/.coverage" -m
fi
"$py" -c 'import atheris' 2>/dev/null || "$py" -m pip install -q 'atheris>=2.3'
exec "$py" tests/fuzz/fuzz_image.py -max_total_time="${1:-3600}" -rss_limit_mb=4096 \
    -timeout=20 -max_len=262144 -print_final_stats=1 -artifact_prefix="$work/" "$work/corpus"
