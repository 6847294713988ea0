#!/usr/bin/env bash
# The transfer benchmark (bench/transfer.py) on one CUDA GPU: ResNet-50 at 224 px, bf16 autocast,
# channels_last; full fine-tune, two partial depths and the feature extractor, with and without the
# frozen-prefix cache, tlray against a plain loop. At most 5 minutes on one GPU. Each tlray row records what
# train.amp resolved to on the card (`precision`: bf16 only where native, compute capability >= 8.0), images/s,
# whether the group used the frozen-prefix cache (`cache`) and the workers' peak GPU memory (`gpu_peak_mib`, per
# epoch; the first epoch after a resume includes the checkpoint's load).
#
#   bench/gpu_check.sh                 # on a machine with a GPU: section "gpu" of bench/results.json
#   bench/gpu_check.sh --dry-run       # on CPU at toy sizes: full fine-tune and feature extractor (the suite runs it)
#   bench/gpu_check.sh --json OUT ...  # anything after the mode goes to bench/transfer.py
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
export RAY_USAGE_STATS_ENABLED=0

if [[ "${1:-}" == "--dry-run" ]]; then
  shift
  exec timeout 600 "$python" bench/transfer.py --only modes --section gpu --device cpu \
    --arch resnet50 --image-size 32 --amp bf16 --channels-last \
    --images 24 --epochs 2 --batch 8 --depths "" --ray-cpus 2 "$@"
fi

"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device (use --dry-run on CPU)")'
exec timeout 300 "$python" bench/transfer.py --only modes --section gpu --device cuda \
  --arch resnet50 --image-size 224 --amp bf16 --channels-last \
  --images 4000 --epochs 3 --batch 128 --depths 2,3 "$@"
