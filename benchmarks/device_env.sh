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
# Every process on a multi-GPU machine: NVLink multicast is not lent (../shared/device/README.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# step CMD...: run one stage, its output (warnings dropped) into $OUT/${LOG:-run.log}, the last
# ${TAIL:-25} lines on screen, then its exit status and seconds.
step() {
  local log="$OUT/${LOG:-run.log}" t0=$SECONDS
  echo "== $*" | tee -a "$log"
  "$@" 2>&1 | grep -v -i warning | tee -a "$log" | tail -"${TAIL:-25}"
  echo "   rc=${PIPESTATUS[0]} ($((SECONDS - t0)) s)" | tee -a "$log"
}
