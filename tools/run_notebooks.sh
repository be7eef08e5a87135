#!/usr/bin/env bash
# Regenerate the notebooks' saved outputs: each notebook runs top to bottom in a fresh kernel, long
# cells (real training) included, in the book's order (03_train trains the shakespeare-char-cpu run that
# 04_generate samples from), then nbdev_clean strips what should not be committed. Datasets and runs go
# where the notebooks put them (the checkout, or $MUNCHKIN_ROOT). Offline, set MUNCHKIN_OFFLINE first.
# tests/test_outputs.py runs the notebooks again (long cells aside) and fails on any saved output
# that no longer matches its code; it starts from the state made here: both tiny Shakespeare
# datasets prepared, the data read from $MUNCHKIN_OFFLINE.
#   tools/run_notebooks.sh                     # every notebook (tens of minutes on 2 CPU cores)
#   tools/run_notebooks.sh 03_train 04_generate  # some, still in the book's order
set -euo pipefail
cd "$(dirname "$0")/.."
unset MPLBACKEND  # a non-interactive backend would keep figures out of the saved outputs

ORDER=(00_data 01_attention 02_gpt 03_train 04_generate 05_tokenizer 10_settings 11_corpus \
       12_checkpoints 13_gpt2_weights 14_cpu_speed 15_bench 16_runs index)
for nb in nbs/*.ipynb; do  # a notebook missing from ORDER still runs, last
  name=$(basename "$nb" .ipynb)
  [[ " ${ORDER[*]} " == *" $name "* ]] || ORDER+=("$name")
done
WANT=("$@")
for name in "${WANT[@]}"; do
  [ -f "nbs/$name.ipynb" ] || { echo "error: no notebook nbs/$name.ipynb" >&2; exit 2; }
done

munchkin-nb-prepare shakespeare_char >/dev/null  # every chapter starts from prepared data
munchkin-nb-prepare shakespeare >/dev/null

for name in "${ORDER[@]}"; do
  [ -f "nbs/$name.ipynb" ] || continue
  if [ ${#WANT[@]} -gt 0 ] && [[ " ${WANT[*]} " != *" $name "* ]]; then continue; fi
  start=$SECONDS
  # nbclient with coalesce_streams: a streamed sample is saved as one output, not one per token
  python - "nbs/$name.ipynb" <<'PY'
import sys, nbformat
from pathlib import Path
from nbclient import NotebookClient
path = Path(sys.argv[1])
nb = nbformat.read(path, as_version=4)
NotebookClient(nb, timeout=None, kernel_name='python3', coalesce_streams=True,
               resources={'metadata': {'path': str(path.parent)}}).execute()
nbformat.write(nb, path)
PY
  echo "$name: $((SECONDS - start)) s, $(du -k "nbs/$name.ipynb" | cut -f1) KB"
done
nbdev_clean
