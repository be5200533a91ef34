#!/usr/bin/env bash
# The whole GPU check in one command, for a bare GPU host with PyTorch but no diffusers and no
# network: wheels for what is missing lie in .whl/ beside the repo (last carried: diffusers 0.42.1,
# torchao 0.18.0, accelerate 1.15.0 + psutil for the streamed text encoder, pydantic 2.14 and its deps,
# jsonschema 4.26 + referencing + rpds-py + jsonschema-specifications for the manifest,
# pytest + pluggy + iniconfig for ZB_GPU_TESTS=1).
#   bash bench/gpu.sh [OUT_DIR] [bench.throughput options...]
# A session's device time (15 minutes) holds two calls of one set each, ~5-6 minutes apiece on an
# H100 (build and compile warm-ups included; estimated from earlier runs). Make the second call
# right after the first: a machine left idle goes back, and a fresh one takes minutes to start.
#   bash bench/gpu.sh $OUT                        # bf16-set (default): the engine, varied captions, a profile
#   bash bench/gpu.sh $OUT --variants fp8-set     # the fp8 profile and the 16 GB one
# (--variants memory-set: the memory profiles and cold start.) Variants not started within --budget (420 s)
# are skipped, and the JSON is rewritten after every variant. Profiles write
# OUT_DIR/profile-trace.json.gz (open in Perfetto). On 2026-11-27 the two calls (the sets of then, with more
# variants) took 406 s and 309 s on an H100.
set -euo pipefail
out=${1:-${OUT:-bench/out}}
shift || true
mkdir -p "$out"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/zb-site .whl/*.whl
  export PYTHONPATH=/tmp/zb-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, diffusers, pydantic, jsonschema; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'pydantic', pydantic.__version__)" | tee -a "$out/gpu.txt"
python3 -c "import torchao; print('torchao', torchao.__version__)" 2>/dev/null | tee -a "$out/gpu.txt" || echo "torchao: not installed (fp8 and vram12 will report it)" | tee -a "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$out/gpu.txt" || true
if [ "${ZB_GPU_TESTS:-0}" = 1 ]; then  # the CUDA-path tests (tests/test_gpu.py, tiny model; ~1-2 min)
  # ZB_GPU_TEST_ARGS narrows them, e.g. ZB_GPU_TEST_ARGS="-k thread" for one test.
  timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider ${ZB_GPU_TEST_ARGS:-} 2>&1 | tee "$out/gpu-tests.log" || true
fi
python3 -m bench.throughput --out "$out/throughput.json" "$@" 2>&1 | tee "$out/throughput.log"
