#!/bin/bash
# train_bench.py with its peers on a GPU machine that has no network (issue 16).
#
#   bash benchmarks/peers_on_device.sh [train_bench.py arguments]     (from the repo root)
#
# The peers travel as wheels in .whl/ (git-ignored; the list and the download command are in
# benchmarks/README.md) and are installed under $PEERS_DIR (default /tmp/dropup-peers).
# OLMo-core's dropless MoE needs the grouped_gemm CUDA extension, which has no wheel: a wheel
# built earlier is taken from .whl/gg/, else it is built here from
# .whl/src/grouped_gemm-0.3.0.tar.gz against the machine's torch (about two minutes on 16
# cores). It is built with GROUPED_GEMM_CUTLASS=1: OLMo-core passes the per-expert token counts
# as a GPU tensor, which only the CUTLASS backend takes (the default cuBLAS backend stops with
# "Expected batch_sizes.is_cpu()"). With OUT set, the built wheel is copied to $OUT/ so that the
# next run can carry it in .whl/gg/.
set -eu
ROOT=$PWD
DIR=${PEERS_DIR:-/tmp/dropup-peers}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
pip_target() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "peers_on_device.sh: no wheels in .whl/; download the peers' wheels as benchmarks/README.md says" >&2
  exit 2
fi
pip_target "$DIR/site" .whl/*.whl
if ! ls .whl/gg/*.whl >/dev/null 2>&1 && [ -f .whl/src/grouped_gemm-0.3.0.tar.gz ]; then
  mkdir -p .whl/gg "$DIR/build"
  tar xzf .whl/src/grouped_gemm-0.3.0.tar.gz -C "$DIR/build"
  (cd "$DIR/build/grouped_gemm-0.3.0" && GROUPED_GEMM_CUTLASS=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=4 \
    python3 -m pip wheel -q --no-cache-dir --no-build-isolation --no-deps --no-index . -w "$ROOT/.whl/gg")
  if [ -n "${OUT:-}" ]; then cp .whl/gg/*.whl "$OUT/"; fi
fi
GG=""
if ls .whl/gg/*.whl >/dev/null 2>&1; then pip_target "$DIR/gg" .whl/gg/*.whl; GG=$DIR/gg:; fi
export PYTHONPATH=$ROOT/src:$GG$DIR/site
python3 benchmarks/train_bench.py "$@"
