#!/usr/bin/env bash
# The GPU check (nbs/15_bench.ipynb): train shakespeare-char in bf16 with compile to val <= 1.47 beside
# nanoGPT's train.py, an fp16 GradScaler run, resume, no compile, cached sampling; one table at the end.
# Runs from a plain checkout with any Python that has torch (the package itself is not installed):
#   tools/gpu_check.sh --nanogpt .nanogpt --source .data/input.txt        # on a machine with one CUDA GPU
#   tools/gpu_check.sh --device cpu --quick --source /path/to/input.txt   # the dry run, about a minute
# Wheels in .whl/ (fastcore, which the package needs) are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! $PY -c 'import torch, numpy, tqdm, fastcore' 2> /dev/null; then
    echo "error: $PY lacks torch, numpy, tqdm or fastcore; carry wheels in .whl/ (pip download --no-deps" \
         "-d .whl fastcore) or set PYTHON to a Python that has them" >&2
    exit 2
fi
exec $PY -c 'from munchkin_nb.bench import bench_cli; bench_cli()' --gpu_check "$@"
