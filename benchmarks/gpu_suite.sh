#!/usr/bin/env bash
# The GPU checks and measurements of this repository, in three parts that each fit one 10-minute
# device call (../shared/devkit sets up vLLM, Ray and $SMOLLM2; logs and results go to $OUT):
#
#   bash benchmarks/gpu_suite.sh quality   # GPU tests, serve equality, passkey/multikey, Ray, faults
#   bash benchmarks/gpu_suite.sh offload   # Llama-3.1-8B shape, KV offload vs FLASH_ATTN (timed alone)
#   bash benchmarks/gpu_suite.sh load      # 64 clients against INFINITEHIP and FLASH_ATTN (timed alone)
#
# "quality" runs its jobs side by side on one GPU (small --gpu-memory-utilization each): none of
# them reports a timing that the others could distort, except Ray batch throughput (noted there).
set -uo pipefail
part="${1:?usage: gpu_suite.sh quality|offload|load}"
OUT="${OUT:-/tmp/gpu_suite}"
mkdir -p "$OUT"
if [ -f /root/devkit/env.sh ]; then
  # shellcheck disable=SC1091
  source /root/devkit/env.sh
fi
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

if ! python3 -c "import vllm_hip._C" 2>/dev/null; then
  stamp "building the csrc extension"
  # the devkit's CC/CXX are for its own builds; nvcc wants the system compiler
  env -u CC -u CXX python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/pip_install.log" 2>&1 \
    || { stamp "extension build failed"; tail -30 "$OUT/pip_install.log"; }
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv >"$OUT/nvidia_smi.csv" 2>&1

case "$part" in
quality)
  EAGER="--enforce-eager"
  stamp "start: pytest, serve equality, passkey, ray, faults (in parallel)"
  (python3 -m pytest -q -p no:cacheprovider tests/test_page_cache.py tests/test_backend.py \
      tests/test_sparse_attention.py tests/test_prune.py tests/test_ops.py tests/test_offload.py \
      tests/test_api.py >"$OUT/pytest_gpu.log" 2>&1; echo "exit $?" >>"$OUT/pytest_gpu.log") &
  (python3 benchmarks/serve_equivalence.py --model "$SMOLLM2" --backends FLASH_ATTN,INFINITEHIP \
      --label 'INFINITEHIP=INFINITEHIP[rope_mode=model]:{"infinitehip":{"rope_mode":"model"}}' \
      --label 'INFINITEHIP=INFINITEHIP[offload]:{"infinitehip":{"offload":true}}' \
      --extra "--max-model-len 8192 --gpu-memory-utilization 0.1 $EAGER" --metrics-tokens 6000 \
      --port 8131 --log-dir "$OUT" --out "$OUT/serve_equivalence.json" >"$OUT/serve_equivalence.log" 2>&1) &
  (python3 benchmarks/passkey.py --model "$SMOLLM2" --parallel --gpu-memory-utilization 0.16 $EAGER \
      --lengths 4096,8192,16384,32768,65536,131072 \
      --out "$OUT/passkey.json" --plot "$OUT/passkey.png" >"$OUT/passkey.log" 2>&1) &
  (sleep 60; python3 benchmarks/ray_batch.py --model "$SMOLLM2" --num-docs 16 --doc-tokens 32768 \
      --gpu-memory-utilization 0.12 $EAGER --timeout 400 --workdir "$OUT/ray_batch" \
      --out "$OUT/ray_batch.json" >"$OUT/ray_batch.log" 2>&1) &
  (sleep 30; python3 benchmarks/fault_test.py --launch --model "$SMOLLM2" --backends INFINITEHIP \
      --server-args "--max-model-len 8192 --num-gpu-blocks-override 1024 --gpu-memory-utilization 0.08 $EAGER" \
      --port 8132 --log-dir "$OUT" --out "$OUT/fault.json" >"$OUT/fault.log" 2>&1
   # Host-memory exhaustion for the offload store: start-up must refuse with the sizes.
   timeout 240 python3 -m vllm.entrypoints.cli.main serve "$SMOLLM2" --attention-backend INFINITEHIP \
      --port 8133 --gpu-memory-utilization 0.08 $EAGER --kv-cache-memory-bytes 4000000000000 \
      --additional-config '{"infinitehip": {"offload": true}}' >"$OUT/offload_host_exhaustion.log" 2>&1
   echo "exit $?" >>"$OUT/offload_host_exhaustion.log") &
  wait
  ;;
offload)
  stamp "start: offload benchmark"
  # FLASH_ATTN first (it bounds the comparison), then INFINITEHIP with the KV in host memory up
  # to 1M tokens; each context is saved as it completes, so a cut-off run keeps the rest.
  python3 benchmarks/offload.py --shape llama-3.1-8b --decode-tokens 48 \
    --backend-contexts "FLASH_ATTN=32768,131072,262144" --timeout "${FA_TIMEOUT:-170}" \
    --gpu-memory-utilization 0.85 --workdir "$OUT/offload" \
    --out "$OUT/offload_fa.json" >"$OUT/offload_fa.log" 2>&1
  python3 benchmarks/offload.py --shape llama-3.1-8b --decode-tokens 48 \
    --backend-contexts "INFINITEHIP=32768,131072,262144,524288,1048576" --timeout "${HIP_TIMEOUT:-380}" \
    --gpu-memory-utilization 0.85 --workdir "$OUT/offload" \
    --out "$OUT/offload_hip.json" >"$OUT/offload_hip.log" 2>&1
  ;;
load)
  stamp "start: load test"
  python3 benchmarks/load_test.py --launch --model "$SMOLLM2" --backends INFINITEHIP,FLASH_ATTN \
    --duration "${LOAD_DURATION:-90}" --concurrency 64 \
    --server-args "--max-model-len 8192 --gpu-memory-utilization 0.7" \
    --log-dir "$OUT" --out "$OUT/load.json" >"$OUT/load.log" 2>&1
  tail -40 "$OUT/load.log"
  ;;
*)
  echo "unknown part $part" >&2
  exit 2
  ;;
esac
stamp "done"
for f in "$OUT"/*.log; do echo "== $f"; grep -v "^INFO\|^(EngineCore\|^(APIServer\|DEBUG" "$f" | tail -25; done
