#!/usr/bin/env bash
# Stage what benchmarks/device_check.sh needs on the GPU machine into the ignored folder .device/:
# the CIFAR-10 sources from ../shared/data and wheels of the packages the GPU image lacks (Python 3.12).
# Then call the device tool with carry [".device"] and command "bash benchmarks/device_check.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device/data .device/whl
cp -r ../shared/data/cifar10 ../shared/data/prepare_cifar10.py .device/data/
for pkg in omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 faiss-cpu; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .device/whl "$pkg" || \
  python3 -m pip download -q --no-deps -d .device/whl "$pkg"
done
du -sh .device
