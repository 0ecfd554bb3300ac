#!/usr/bin/env bash
# The GPU checks as one script, for a GPU machine whose image has CUDA PyTorch but not helip's other
# dependencies: put their wheels in .whl/ first (on a machine with pip access:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl faiss-cpu open_clip_torch ftfy wcwidth webdataset braceexpand)
# or run it inside helip's own venv. Writes to $OUT (default /tmp/gpu_checks).
#   bash benchmarks/gpu_checks.sh            # tests on CUDA, then mining benchmarks at 200k and 1M
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, faiss; print('torch', torch.__version__, 'faiss', faiss.__version__)" | tee -a "$OUT/gpu.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_mining.py tests/test_mining_modes.py \
  2>&1 | tee "$OUT/pytest_cuda.txt" | tail -15
timeout 210 python3 benchmarks/bench_mining.py --device cuda --sizes 200000,1000000 --methods authors,exact,ann \
  --ann-only-from 100000000 --authors-targets 60000 --tmpdir /tmp --out "$OUT/bench_mining_h200.json" 2>&1 | tail -40
# (3M exact on an H100: benchmarks/results/bench_mining_h100_large.json)
