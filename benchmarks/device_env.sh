# Sourced on a lent GPU machine (see ../shared/device/README.md): TVM from the staged
# parts, the few wheels the image lacks, and this checkout importable as `shardtune`.
source .device/part2/setup.sh || return 3
if [ -d .device/extra ] && [ ! -e /tmp/site/cloudpickle ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/extra/*.whl
fi
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/shardtune
export PYTHONPATH=/tmp/pkg:$PYTHONPATH
# NVRTC needs the cuda-bindings package; without it, let TVM call nvcc.
python3 -c "import cuda.bindings" 2>/dev/null || export TVM_CUDA_COMPILE_MODE=nvcc
