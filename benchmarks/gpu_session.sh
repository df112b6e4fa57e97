#!/usr/bin/env bash
# One short call on a lent GPU machine (see benchmarks/README.md): CUDA tests, the GPU
# benchmark, a CLI training run on CUDA, then the whole suite with what time is left.
# Usage there:  OUT=/some/dir bash benchmarks/gpu_session.sh
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 MPLBACKEND=Agg
OUT=${OUT:-/tmp/deqkit-gpu}; mkdir -p "$OUT"
py=python3
$py -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
timeout 170 $py -m pytest -q -p no:cacheprovider -m cuda tests -o addopts="-ra" 2>&1 | tail -25 | tee "$OUT/pytest_cuda.txt"
timeout 120 $py benchmarks/gpu.py --repeats 10 --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.txt"
timeout 80 $py -m deqkit train --model conv_deq --data digits --epochs 12 --lr 3e-3 \
  --device cuda --precision bf16 --rtol 1e-2 --out /tmp/run-digits --no-progress --no-plots \
  2>&1 | tail -18 | tee "$OUT/train_digits_cuda.txt"
timeout 170 $py -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -25 | tee "$OUT/pytest_all.txt"
