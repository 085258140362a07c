#!/usr/bin/env bash
# MNIST density estimation on a CUDA machine (paper section 4.1, arXiv:1809.10188).
#
# Default: time a few training iterations of the paper's configuration (D=784, h=1024,
# 100 RK4 steps of 0.1, batch 100) with and without gradient checkpointing, in float32
# and with TF32 matmuls.
# --full: then run the full reproduction, models/mnist.py with the paper's defaults until early
# stopping (many hours); rerunning the script resumes from the run's checkpoint.
#
#   bash benchmarks/gpu_mnist.sh                    # timing only, a few minutes
#   bash benchmarks/gpu_mnist.sh --full             # + full run into runs/mnist_paper
#   bash benchmarks/gpu_mnist.sh --full --nproc 8   # data parallel over 8 GPUs (torchrun)
#   bash benchmarks/gpu_mnist.sh --full -- --tf32 --max-minutes 600   # extra flags for models/mnist.py
#
# Environment: PY (python to use; default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
FULL=0
ITERS=5
NPROC=1
OUT=runs/mnist_paper
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --full) FULL=1 ;;
    --iters) ITERS=$2; shift ;;
    --nproc) NPROC=$2; shift ;;
    --out) OUT=$2; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

run() {
  echo "+ $*"
  "$@"
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  ver=$("$PY" -c "import torch; print(torch.__version__, 'CUDA build' if torch.version.cuda else 'CPU-only build')" 2>/dev/null || echo "no torch")
  echo "error: no CUDA device is visible to $PY (torch: $ver). This script needs an NVIDIA GPU and a CUDA" \
       "build of torch; on a CPU run 'python benchmarks/mnist_speed.py' and 'python -m models.mnist' instead." >&2
  exit 1
fi
command -v nvidia-smi >/dev/null && run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

mkdir -p benchmarks/results
run "$PY" benchmarks/mnist_speed.py --device cuda --iters "$ITERS" --warmup 2 --json benchmarks/results/mnist_speed_cuda.json
run "$PY" benchmarks/mnist_speed.py --device cuda --iters "$ITERS" --warmup 2 --tf32 --json benchmarks/results/mnist_speed_cuda_tf32.json

if [ "$FULL" = 1 ]; then
  RESUME=()
  [ -f "$OUT/checkpoint.pt" ] && RESUME=(--resume "$OUT/checkpoint.pt")
  # memory is no constraint on a GPU (< 1 GB per process without checkpointing): trade it for speed
  ARGS=(--device cuda --no-grad-checkpoint --out "$OUT" "${RESUME[@]}" "${EXTRA[@]}")
  if [ "$NPROC" -gt 1 ]; then
    run "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" models/mnist.py "${ARGS[@]}"
  else
    run "$PY" -m models.mnist "${ARGS[@]}"
  fi
  echo "results: $OUT/summary.json, $OUT/log.csv, figures $OUT/{samples,gaussianization,nll}.png"
fi
