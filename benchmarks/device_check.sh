#!/usr/bin/env bash
# One prepared GPU check (<= 8 minutes on one H100/H200), run through the device tool from the repo root:
#   1. prepare CIFAR-10 from the carried copy (.device/data: cifar10/ + prepare_cifar10.py);
#   2. train_throughput.py: (a) step only, (b) sepp pipeline, (c) torchvision PIL workers — MoCo-v2 symmetric,
#      ResNet-18 CIFAR stem, batch 512, bf16, channels_last;
#   3. mining.py: exact bf16 top-10 over 1.28M x 2048, then exact vs FAISS recall at 200k x 2048;
#   4. a short real training run (sepp pretrain, full CIFAR-10, 3 epochs) with the kNN monitor;
#   5. the CUDA-relevant tests (augmentation, search, methods) on the GPU.
# Results go to $OUT (JSON + logs). Prepare here first: bash benchmarks/prepare_device.sh
# Python packages the GPU image lacks (omegaconf, antlr4, faiss-cpu) travel as wheels in .device/whl.
set -uo pipefail
OUT=${OUT:-/tmp/sepp_device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if ls .device/whl/* >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export SEPP_DATA=$PWD/.device/data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
if [ ! -f "$SEPP_DATA/cifar-10-batches-py/data_batch_1" ]; then
  python3 .device/data/prepare_cifar10.py "$SEPP_DATA" 2>&1 | tail -1
fi
step() { echo "== $1"; shift; timeout "$@"; echo "(exit $?)"; }
{
step "throughput" 150 python3 benchmarks/train_throughput.py --device cuda --batch 512 --steps 60 --warmup 10 \
     --workers 16 --json "$OUT/train_throughput.json"
step "mining 1.28M x 2048 bf16" 120 python3 benchmarks/mining.py --n 1281167 --d 2048 --k 10 --device cuda \
     --backends bf16 --chunk 8192 --json "$OUT/mining_full.json"
step "mining 200k x 2048 exact vs faiss" 90 python3 benchmarks/mining.py --n 200000 --d 2048 --k 10 \
     --device cuda --backends bf16,fp32,faiss --chunk 8192 --json "$OUT/mining_faiss.json"
step "short real training" 120 python3 -m sepp.cli pretrain --config cifar10_mocov2 device=cuda \
     train.epochs=3 train.knn_every=1 out=/tmp/sepp_run
cp /tmp/sepp_run/metrics.csv "$OUT/train_metrics.csv" 2>/dev/null
step "cuda tests" 60 python3 -m pytest -q -x tests/test_gpu_augment.py tests/test_search.py tests/test_methods.py
} 2>&1 | tee "$OUT/device_check.log"
