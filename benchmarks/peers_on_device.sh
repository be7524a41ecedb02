#!/bin/bash
# train_bench.py with its peers on a GPU machine that has no network (issue 16).
#
#   bash benchmarks/peers_on_device.sh [train_bench.py arguments]     (from the repo root)
#
# The peers travel as wheels in .whl/ (git-ignored; the list and the download command are in
# benchmarks/README.md) and are installed into /tmp/site. OLMo-core's dropless MoE needs the
# grouped_gemm CUDA extension, which has no wheel: a wheel built earlier is taken from .whl/gg/,
# else it is built here from .whl/src/grouped_gemm-0.3.0.tar.gz against the machine's torch
# (about two minutes on 16 cores). It is built with GROUPED_GEMM_CUTLASS=1: OLMo-core passes the
# per-expert token counts as a GPU tensor, which only the CUTLASS backend takes (the default
# cuBLAS backend stops with "Expected batch_sizes.is_cpu()"). With OUT set, the built wheel is
# copied to $OUT/ so that the next run can carry it in .whl/gg/.
set -eu
ROOT=$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
pip_target() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
pip_target /tmp/site .whl/*.whl
if ! ls .whl/gg/*.whl >/dev/null 2>&1 && [ -f .whl/src/grouped_gemm-0.3.0.tar.gz ]; then
  mkdir -p .whl/gg /tmp/gg-build
  tar xzf .whl/src/grouped_gemm-0.3.0.tar.gz -C /tmp/gg-build
  (cd /tmp/gg-build/grouped_gemm-0.3.0 && GROUPED_GEMM_CUTLASS=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=4 \
    python3 -m pip wheel -q --no-cache-dir --no-build-isolation --no-deps --no-index . -w "$ROOT/.whl/gg")
  if [ -n "${OUT:-}" ]; then cp .whl/gg/*.whl "$OUT/"; fi
fi
GG=""
if ls .whl/gg/*.whl >/dev/null 2>&1; then pip_target /tmp/gg .whl/gg/*.whl; GG=/tmp/gg:; fi
export PYTHONPATH=$ROOT/src:$GG/tmp/site
python3 benchmarks/train_bench.py "$@"
