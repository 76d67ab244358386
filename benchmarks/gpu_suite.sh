#!/usr/bin/env bash
# The GPU checks and measurements of this repository, in parts that each fit one 10-minute
# device call (../shared/devkit sets up vLLM, Ray and $SMOLLM2; logs and results go to $OUT):
#
#   bash benchmarks/gpu_suite.sh prep      # no vLLM needed: builds csrc and runs the kernel/op
#                                          # tests in the background (setsid), so it can start
#                                          # in the first devkit staging call and overlap the rest
#   bash benchmarks/gpu_suite.sh quality   # plugin tests, serve equality, passkey/multikey,
#                                          # faults, offload + /metrics (collects prep's logs);
#                                          # PASSKEY_BACKENDS trims it; RAY_BATCH=1 adds the Ray
#                                          # batch job, SWEEP=1 the transformers-path sweep
#                                          # (SWEEP_CONFIGS=file.json): with them, 8 jobs share
#                                          # 16 CPU cores and servers took 60-90 s to start
#   bash benchmarks/gpu_suite.sh configs   # passkey/multikey of every configuration in
#                                          # benchmarks/sweep_configs.json, vLLM and transformers
#   bash benchmarks/gpu_suite.sh offload   # Llama-3.1-8B shape, KV offload vs FLASH_ATTN (timed alone)
#   bash benchmarks/gpu_suite.sh equality  # serve equality of offload and the un-rotated cache
#   bash benchmarks/gpu_suite.sh kernels   # kernels.py vs FA3 for each --rope mode (timed alone)
#   bash benchmarks/gpu_suite.sh profile   # decode throughput of a served batch, cProfile + kernel
#                                          # profile (after prep), then the KV-pressure fault
#   bash benchmarks/gpu_suite.sh faults    # the fault suite alone, GPU runs of FAULT_TESTS beside it
#   bash benchmarks/gpu_suite.sh load      # 64 clients against INFINITEHIP and FLASH_ATTN (timed alone;
#                                          # LOAD_PARALLEL=1 both at once, LOAD_INVARIANT=1 batch-
#                                          # invariant mode, LOAD_FAULTS=1 the fault suite beside,
#                                          # LOAD_TESTS="tests/x.py .." GPU test runs beside)
#
# "quality" runs its jobs side by side on one GPU (small --gpu-memory-utilization each) under
# one deadline (SUITE_BUDGET seconds, default 540): every job gets a timeout that ends before
# it, and every job writes its results as it goes, so a run cut short still reports what it
# finished. None of its jobs reports a timing that the others could not distort, except Ray
# batch throughput (noted in its records).
set -uo pipefail
part="${1:?usage: gpu_suite.sh prep|quality|configs|offload|faults|equality|kernels|profile|load}"
PREP=/tmp/vllm_hip_prep
# Jobs write to $OUT (a work folder); the device tool brings back at most 8 files of the folder
# it names $OUT, so that one gets a tarball of everything (refreshed every 30 s, so a call cut
# off still brings back what was written) and a copy of the summary JSON/PNG files.
RETURN="${OUT:-}"
export OUT=/tmp/gpu_suite_$part
mkdir -p "$OUT"
snapshot() {
  [ -n "$RETURN" ] || return 0
  tar -C "$(dirname "$OUT")" -czf "$RETURN/.suite.tgz" "$(basename "$OUT")" 2>/dev/null \
    && mv "$RETURN/.suite.tgz" "$RETURN/suite_$part.tgz"
}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
t0=$(date +%s)
deadline=$((t0 + ${SUITE_BUDGET:-540}))
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
left() {  # seconds to the deadline, less a margin (at least 1: timeout refuses 0 and negatives)
  # and the 10 s that "timeout -k 10" may add
  local l=$(( deadline - $(date +%s) - ${1:-15} - 10 ))
  echo $(( l < 1 ? 1 : l ))
}

if [ "$part" = prep ]; then
  # Build in a copy of the tree (later calls re-copy the working tree) and test there.
  rm -rf "$PREP" && mkdir -p "$PREP/tree" && tar --exclude=./.devkit -cf - . | tar -C "$PREP/tree" -xf -
  # Not installed there: setup.py maps triton_kernels/ to the package vllm_hip_kernels, which
  # the tests import; a link under that name on PYTHONPATH stands in for the install.
  mkdir -p "$PREP/path" && ln -s "$PREP/tree/triton_kernels" "$PREP/path/vllm_hip_kernels"
  # PREP_TESTS=1 (default): every kernel/op test file; 0: build only; anything else: those files.
  tests="tests/test_prune.py tests/test_sparse_attention.py tests/test_page_cache.py tests/test_ops.py
    tests/test_offload.py tests/test_api.py tests/test_host_copy.py"
  case "${PREP_TESTS:-1}" in 1) ;; 0) tests="" ;; *) tests="$PREP_TESTS" ;; esac
  setsid nohup bash -c "
    cd $PREP/tree
    export PYTHONPATH=$PREP/path:$PREP/tree\${PYTHONPATH:+:\$PYTHONPATH}
    env -u CC -u CXX python3 setup.py build_ext --inplace >$PREP/build.log 2>&1; echo \"exit \$?\" >>$PREP/build.log
    [ -n \"$(echo $tests)\" ] && python3 -m pytest -q -p no:cacheprovider $(echo $tests) \
      >$PREP/pytest_kernels.log 2>&1; echo \"exit \$?\" >>$PREP/pytest_kernels.log
    touch $PREP/done" >/dev/null 2>&1 </dev/null &
  stamp "prep started in the background ($PREP)"
  exit 0
fi

if [ -f /root/devkit/env.sh ]; then
  # shellcheck disable=SC1091
  source /root/devkit/env.sh
fi
stamp "devkit ready"
(while sleep 30; do snapshot; done) &
snapper=$!
# The plugin must be installed (its vllm.general_plugins entry point); reuse prep's extension.
if ls "$PREP"/tree/vllm_hip/_C*.so >/dev/null 2>&1; then
  cp "$PREP"/tree/vllm_hip/_C*.so vllm_hip/
  VLLM_HIP_SKIP_EXT=1 python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/pip_install.log" 2>&1
else
  stamp "building the csrc extension"
  # the devkit's CC/CXX are for its own builds; nvcc wants the system compiler
  env -u CC -u CXX python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/pip_install.log" 2>&1
fi || { stamp "install failed"; tail -30 "$OUT/pip_install.log"; }
python3 -c "import vllm_hip._ops as o; print('vllm_hip._C loaded:', o.has_ops())"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv >"$OUT/nvidia_smi.csv" 2>&1

# The fault suite (one INFINITEHIP server; it starts 30 s late so that it does not slow the
# others' start-up). A KV cache of ~13K tokens (SmolLM2: 23 KB a token), under two max-length
# requests: the KV-pressure fault must preempt (a fixed --kv-cache-memory-bytes wins over
# --num-gpu-blocks-override, which left the H200 run without preemption). Then host-memory
# exhaustion for the offload store: start-up must refuse with the sizes.
run_faults() {
  sleep "${FAULTS_DELAY:-30}"
  # The burst: 12 requests of 3,000 tokens, 512 generated each (4 fit at once, and outgrow the
  # cache in decode); 3 re-sent alone. Larger bursts did not finish in a call (decode of this
  # eager server under the suite's other jobs: ~14 tokens/s a request).
  # Batch-invariant: a preempted request's greedy output must then equal the prompt's alone (the
  # seventh session's burst preempted 4 times, and 3 of 3 differed outside that mode).
  timeout -k 10 "$(left)" python3 benchmarks/fault_test.py --launch --model "$SMOLLM2" --backends INFINITEHIP \
      --batch-invariant --pressure-requests 12 --pressure-prompt-tokens 3000 --pressure-new-tokens 512 --pressure-verify 3 \
      --server-args "--max-model-len 8192 --gpu-memory-utilization 0.05 --kv-cache-memory-bytes 300000000 --enforce-eager --middleware vllm_hip.http_guard.JsonObjectBody" \
      --port 8132 --log-dir "$OUT" --out "$OUT/fault.json" >"$OUT/fault.log" 2>&1
  timeout -k 10 120 python3 -m vllm.entrypoints.cli.main serve "$SMOLLM2" --attention-backend INFINITEHIP \
      --port 8133 --gpu-memory-utilization 0.05 --enforce-eager --kv-cache-memory-bytes 4000000000000 \
      --additional-config '{"infinitehip": {"offload": true}}' >"$OUT/offload_host_exhaustion.log" 2>&1
  echo "exit $?" >>"$OUT/offload_host_exhaustion.log"
}

case "$part" in
quality)
  EAGER="--enforce-eager"
  pids=()
  # Fixed KV sizes everywhere: vLLM's memory profiling asserts that no other process frees GPU
  # memory while it runs, which side-by-side jobs would break.
  SMALL="--max-model-len 8192 --gpu-memory-utilization 0.05 --kv-cache-memory-bytes 2000000000 $EAGER"
  stamp "start: pytest, serve equality, passkey, ray, faults (in parallel); $(left)s to the deadline"
  (timeout -k 10 "$(left)" python3 -m pytest -q -p no:cacheprovider tests/test_backend.py tests/test_plugin.py \
      tests/test_worker.py >"$OUT/pytest_plugin.log" 2>&1; echo "exit $?" >>"$OUT/pytest_plugin.log") &
  pids+=($!)
  # Two comparison chains on two ports, each against FLASH_ATTN: TRITON_ATTN is vLLM's own
  # second backend, i.e. how far two exact kernels drift apart in greedy decoding.
  (timeout -k 10 "$(left)" python3 benchmarks/serve_equivalence.py --model "$SMOLLM2" \
      --backends FLASH_ATTN,INFINITEHIP --label 'INFINITEHIP=INFINITEHIP[offload]:{"infinitehip":{"offload":true}}' \
      --extra "$SMALL" --metrics-tokens 6000 --startup-timeout 240 \
      --port 8131 --log-dir "$OUT" --out "$OUT/serve_equivalence.json" >"$OUT/serve_equivalence.log" 2>&1) &
  pids+=($!)
  # The Ray executor first (issue 7: plugin and config on a Ray worker, /metrics through Ray).
  (sleep 20; timeout -k 10 "$(left)" python3 benchmarks/serve_equivalence.py --model "$SMOLLM2" \
      --backends FLASH_ATTN \
      --label 'INFINITEHIP=INFINITEHIP[ray]:{}' --run-args 'INFINITEHIP[ray]=--distributed-executor-backend ray' \
      --label 'TRITON_ATTN=TRITON_ATTN:{}' \
      --label 'INFINITEHIP=INFINITEHIP[unrotated]:{"infinitehip":{"rope_cache":"unrotated"}}' \
      --extra "$SMALL" --metrics-tokens 6000 --startup-timeout 240 \
      --port 8134 --log-dir "$OUT" --out "$OUT/serve_equivalence_noise.json" >"$OUT/serve_equivalence_noise.log" 2>&1) &
  pids+=($!)
  # TRITON_ATTN too: its top-1 agreement with FLASH_ATTN is the noise floor for ours.
  (timeout -k 10 "$(left 5)" python3 benchmarks/passkey.py --model "$SMOLLM2" --parallel --gpu-memory-utilization 0.1 $EAGER \
      --backends "${PASSKEY_BACKENDS:-INFINITEHIP,FLASH_ATTN,TRITON_ATTN}" --kv-cache-memory-bytes 8000000000 \
      --lengths 4096,8192,16384,32768,65536,131072 --time-budget "$(left 40)" \
      --out "$OUT/passkey.json" --plot "$OUT/passkey.png" >"$OUT/passkey.log" 2>&1) &
  pids+=($!)
  # The keys' other cache form beside the default, on the same prompts (PASSKEY_UNROTATED=0 skips).
  if [ "${PASSKEY_UNROTATED:-1}" = 1 ]; then
    (sleep 10; timeout -k 10 "$(left 5)" python3 benchmarks/passkey.py --model "$SMOLLM2" --gpu-memory-utilization 0.1 $EAGER \
        --backends INFINITEHIP --label 'INFINITEHIP[unrotated]' --additional-config '{"infinitehip":{"rope_cache":"unrotated"}}' \
        --kv-cache-memory-bytes 8000000000 --lengths 4096,8192,16384,32768,65536,131072 --time-budget "$(left 45)" \
        --out "$OUT/passkey_unrotated.json" >"$OUT/passkey_unrotated.log" 2>&1) &
    pids+=($!)
  fi
  if [ "${RAY_BATCH:-0}" = 1 ]; then
    (sleep 40; timeout -k 10 "$(left)" python3 benchmarks/ray_batch.py --model "$SMOLLM2" --num-docs 16 --doc-tokens 32768 \
        --gpu-memory-utilization 0.08 --kv-cache-memory-bytes 6000000000 $EAGER --parallel --timeout "$(left 60)" --workdir "$OUT/ray_batch" \
        --out "$OUT/ray_batch.json" >"$OUT/ray_batch.log" 2>&1) &
    pids+=($!)
  fi
  # Configurations side by side on the same passkey prompts (transformers path, same kernels),
  # and the transformers path on the prompts the vLLM backend answered (issue 10).
  if [ "${SWEEP:-0}" = 1 ]; then
    (timeout -k 10 "$(left)" python3 benchmarks/hf_vs_vllm_passkey.py benchmarks/results/raw/passkey_raw_INFINITEHIP_h200.json \
        --lengths 16384,32768 --device cuda --out "$OUT/passkey_hf_vs_vllm_gpu.json" >"$OUT/passkey_hf_vs_vllm_gpu.log" 2>&1
     timeout -k 10 "$(left)" python3 benchmarks/passkey_sweep.py --lengths "${SWEEP_LENGTHS:-32768,131072}" \
        --configs-file "${SWEEP_CONFIGS:-benchmarks/sweep_configs.json}" --time-budget "$(left 45)" \
        --out "$OUT/passkey_sweep.json" --plot "$OUT/passkey_sweep.png" >"$OUT/passkey_sweep.log" 2>&1) &
    pids+=($!)
  fi
  run_faults &
  pids+=($!)
  wait "${pids[@]}"  # not a bare wait: the snapshot loop never ends
  ;;
configs)
  # Every configuration of SWEEP_CONFIGS through vLLM (one passkey.py engine each, side by side),
  # and through transformers (passkey_sweep.py) on the same prompts.
  EAGER="--enforce-eager"
  pids=()
  cfgs="${SWEEP_CONFIGS:-benchmarks/sweep_configs.json}"
  for name in $(python3 -c "import json,sys; print(' '.join(k for k in json.load(open(sys.argv[1])) if not k.startswith('_')))" "$cfgs"); do
    opts=$(python3 -c "import json,sys; print(json.dumps({'infinitehip': json.load(open(sys.argv[1]))[sys.argv[2]]}))" "$cfgs" "$name")
    mkdir -p "$OUT/cfg_$name"
    (OUT="$OUT/cfg_$name" timeout -k 10 "$(left 5)" python3 benchmarks/passkey.py --model "$SMOLLM2" --gpu-memory-utilization 0.05 $EAGER \
        --backends INFINITEHIP --label "INFINITEHIP[$name]" --additional-config "$opts" --kv-cache-memory-bytes 6000000000 \
        --lengths "${CONFIG_LENGTHS:-4096,8192,16384,32768,65536,131072}" --text-lengths "" --time-budget "$(left 30)" \
        --out "$OUT/cfg_$name/passkey.json" >"$OUT/passkey_$name.log" 2>&1) &
    pids+=($!)
    sleep 3
  done
  if [ "${SWEEP:-1}" = 1 ]; then
    (timeout -k 10 "$(left)" python3 benchmarks/passkey_sweep.py --lengths "${SWEEP_LENGTHS:-32768,131072}" \
        --configs-file "$cfgs" --time-budget "$(left 45)" \
        --out "$OUT/passkey_sweep.json" --plot "$OUT/passkey_sweep.png" >"$OUT/passkey_sweep.log" 2>&1) &
    pids+=($!)
  fi
  wait "${pids[@]}"
  python3 benchmarks/passkey.py --from-raw "$(ls "$OUT"/cfg_*/passkey_raw_*.json | paste -sd,)" \
    --out "$OUT/passkey_configs.json" --plot "$OUT/passkey_configs.png" >"$OUT/passkey_configs.log" 2>&1
  cat "$OUT/passkey_configs.log"
  ;;
offload)
  stamp "start: offload benchmark"
  # FLASH_ATTN first (it bounds the comparison; FA_CONTEXTS= skips it), then INFINITEHIP with
  # the KV in host memory up to 1M tokens; each context is saved as it completes, so a cut-off
  # run keeps the rest. OFFLOAD_SHAPE=llama-3.2-1b for the 3M-token run, OFFLOAD_PROFILE=1 adds
  # a torch.profiler + cProfile pass over 16 decode steps per context, OFFLOAD_FAULTS=1 runs the
  # fault suite beside it (its own small server: the timings are then shared-GPU ones).
  if [ "${OFFLOAD_FAULTS:-0}" = 1 ]; then run_faults & fpid=$!; fi
  shape="${OFFLOAD_SHAPE:-llama-3.1-8b}"
  prof=(); [ "${OFFLOAD_PROFILE:-0}" = 1 ] && prof=(--profile-dir "$OUT/offload_profile")
  if [ -n "${FA_CONTEXTS-131072,262144}" ]; then
    python3 benchmarks/offload.py --shape "$shape" --decode-tokens 48 --chunk "${OFFLOAD_CHUNK:-32768}" \
      --backend-contexts "FLASH_ATTN=${FA_CONTEXTS:-131072,262144}" --timeout "${FA_TIMEOUT:-170}" \
      --gpu-memory-utilization 0.85 --workdir "$OUT/offload" "${prof[@]}" \
      --out "$OUT/offload_fa.json" >"$OUT/offload_fa.log" 2>&1
  fi
  python3 benchmarks/offload.py --shape "$shape" --decode-tokens 48 --chunk "${OFFLOAD_CHUNK:-32768}" \
    --backend-contexts "INFINITEHIP=${HIP_CONTEXTS:-131072,1048576}" --timeout "$(left 20)" \
    --gpu-cache-tokens "${GPU_CACHE_TOKENS:-16384}" ${HIP_OPTIONS:+--infinitehip "$HIP_OPTIONS"} \
    --gpu-memory-utilization 0.85 --workdir "$OUT/offload" "${prof[@]}" \
    --out "$OUT/offload_hip.json" >"$OUT/offload_hip.log" 2>&1
  grep -v "^INFO\|^(EngineCore\|DEBUG\|^WARNING\|^\[W" "$OUT"/offload_*.log | tail -30
  for f in "$OUT"/offload_profile/*_kernels.txt; do [ -f "$f" ] && { echo "== $f"; sed -n 1,30p "$f" | cut -c1-200; }; done
  for f in "$OUT"/offload_profile/*_cprofile.txt; do [ -f "$f" ] && { echo "== $f"; sed -n 1,40p "$f" | cut -c1-180; }; done
  [ -n "${fpid:-}" ] && wait "$fpid" && tail -25 "$OUT/fault.log"
  ;;
faults)
  # The fault suite alone (FAULTS_DELAY=0), and beside it (a small test process) the GPU runs
  # of FAULT_TESTS: PyTorch's sync debug mode over our serving steps, CUDA-graph replays equal
  # to eager steps.
  stamp "start: faults + ${FAULT_TESTS:=tests/test_host_waits.py tests/test_decode_graphs.py}"
  (timeout -k 10 "$(left 20)" python3 -m pytest -q -p no:cacheprovider $FAULT_TESTS \
      >"$OUT/pytest_gpu_faults_tests.log" 2>&1; echo "exit $?" >>"$OUT/pytest_gpu_faults_tests.log") & tpid=$!
  FAULTS_DELAY=0 run_faults
  wait "$tpid"
  tail -25 "$OUT/fault.log"; tail -15 "$OUT/pytest_gpu_faults_tests.log"; tail -5 "$OUT/offload_host_exhaustion.log"
  ;;
load)
  stamp "start: load test"
  # LOAD_BACKENDS=INFINITEHIP / FLASH_ATTN in two calls for LOAD_DURATION=300 (one call: 10 min),
  # or LOAD_PARALLEL=1: both servers at once on the one GPU, each under its own 64 clients (one
  # call; the throughput is then not a single-server number and the records say so: time-sharing
  # hurts a server that launches many small kernels more than one that replays CUDA graphs).
  # LOAD_INVARIANT=1: servers under VLLM_BATCH_INVARIANT=1, where every loaded output must equal
  # the prompt served alone (vLLM's guarantee for FLASH_ATTN, ours for INFINITEHIP).
  inv=(); [ "${LOAD_INVARIANT:-0}" = 1 ] && inv=(--batch-invariant)
  if [ "${LOAD_PARALLEL:-0}" = 1 ]; then
    lpids=(); port=8141
    IFS=, read -ra lbs <<<"${LOAD_BACKENDS:-INFINITEHIP,FLASH_ATTN}"
    for b in "${lbs[@]}"; do
      # --deadline: stop the solo re-sends in time for the records to be written
      (timeout -k 10 "$(left 5)" python3 benchmarks/load_test.py --launch --model "$SMOLLM2" --backends "$b" \
        --deadline "$(left 30)" \
        --duration "${LOAD_DURATION:-90}" --concurrency 64 --max-prompt-tokens 8000 --port "$port" "${inv[@]}" --note "shared GPU: ${LOAD_BACKENDS:-INFINITEHIP,FLASH_ATTN} loaded at the same time" \
        --server-args "--max-model-len 8192 --gpu-memory-utilization 0.3 --kv-cache-memory-bytes 20000000000" \
        --log-dir "$OUT" --out "$OUT/load_$b.json" >"$OUT/load_$b.log" 2>&1) &
      lpids+=($!); port=$((port + 1))
    done
    # LOAD_FAULTS=1: the fault suite beside the loaded servers (its own small server)
    if [ "${LOAD_FAULTS:-0}" = 1 ]; then run_faults & lpids+=($!); fi
    # LOAD_TESTS="tests/..": GPU runs of those test files beside (a small test process)
    if [ -n "${LOAD_TESTS:-}" ]; then
      (timeout -k 10 "$(left 20)" python3 -m pytest -q -p no:cacheprovider $LOAD_TESTS \
          >"$OUT/pytest_gpu_load_tests.log" 2>&1; echo "exit $?" >>"$OUT/pytest_gpu_load_tests.log") & lpids+=($!)
    fi
    wait "${lpids[@]}"
    python3 -c "import json,sys; json.dump(sum((json.load(open(f)) for f in sys.argv[2:]), []), open(sys.argv[1], 'w'), indent=1)" \
      "$OUT/load.json" "$OUT"/load_*.json 2>/dev/null
    tail -n 15 "$OUT"/load_*.log
    [ -f "$OUT/pytest_gpu_load_tests.log" ] && tail -n 5 "$OUT/pytest_gpu_load_tests.log"
  else
    python3 benchmarks/load_test.py --launch --model "$SMOLLM2" --backends "${LOAD_BACKENDS:-INFINITEHIP,FLASH_ATTN}" \
      --duration "${LOAD_DURATION:-90}" --concurrency 64 "${inv[@]}" \
      --server-args "--max-model-len 8192 --gpu-memory-utilization 0.7" \
      --log-dir "$OUT" --out "$OUT/load.json" >"$OUT/load.log" 2>&1
    tail -40 "$OUT/load.log"
  fi
  ;;
equality)
  # Serve equality of the configurations the quality chains do not reach in time: offload and
  # the un-rotated key cache, against FLASH_ATTN (their outputs are our exact kernel's there).
  timeout -k 10 "$(left)" python3 benchmarks/serve_equivalence.py --model "$SMOLLM2" \
      --backends FLASH_ATTN \
      --label 'INFINITEHIP=INFINITEHIP[offload]:{"infinitehip":{"offload":true}}' \
      --label 'INFINITEHIP=INFINITEHIP[unrotated]:{"infinitehip":{"rope_cache":"unrotated"}}' \
      --extra "--max-model-len 8192 --gpu-memory-utilization 0.05 --kv-cache-memory-bytes 2000000000 --enforce-eager" \
      --metrics-tokens 6000 --startup-timeout 240 --port 8135 --log-dir "$OUT" \
      --out "$OUT/serve_equivalence_more.json" >"$OUT/serve_equivalence_more.log" 2>&1
  tail -20 "$OUT/serve_equivalence_more.log"
  ;;
kernels)
  # Kernel latencies vs FA3 at Llama-3.1-8B shapes for each way keys meet RoPE (KERNEL_ROPES):
  # what the default rope_cache="rotated" costs against the un-rotated cache and no RoPE at all.
  for _ in $(seq 1 "${PREP_WAIT:-180}"); do [ -f "$PREP/done" ] && break; sleep 1; done
  IFS=, read -ra ropes <<<"${KERNEL_ROPES:-model,unrotated,rotated}"
  for m in "${ropes[@]}"; do
    stamp "kernels.py --rope $m"
    timeout -k 10 "$(left 10)" python3 benchmarks/kernels.py --rope "$m" \
        --contexts "${KERNEL_CONTEXTS:-131072,1048576}" --out "$OUT/kernels_$m.json" >"$OUT/kernels_$m.log" 2>&1
    grep -v "^INFO\|^WARNING" "$OUT/kernels_$m.log" | tail -6
  done
  python3 -c "import json,sys; json.dump(sum((json.load(open(f)) for f in sys.argv[2:]), []), open(sys.argv[1], 'w'), indent=1)" \
    "$OUT/kernels.json" "$OUT"/kernels_*.json 2>/dev/null
  ;;
profile)
  # After prep's kernel tests (they would share the GPU with the timed steps): the decode
  # throughput of a served batch and where its time goes (cProfile + torch.profiler), then
  # whatever of the fault suite's KV-pressure case fits (PROFILE_FAULTS=0 skips it).
  for _ in $(seq 1 "${PREP_WAIT:-180}"); do [ -f "$PREP/done" ] && break; sleep 1; done
  stamp "start: profile (prep done: $([ -f "$PREP/done" ] && echo yes || echo no))"
  timeout -k 10 "$(left 60)" python3 benchmarks/profile_decode.py --model "$SMOLLM2" --backends INFINITEHIP,FLASH_ATTN \
      --batch "${PROFILE_BATCH:-4}" --prompt-tokens "${PROFILE_TOKENS:-6000}" --decode-tokens 64 --enforce-eager \
      --kv-cache-memory-bytes 4000000000 --profile-dir "$OUT/profile" --timeout 200 \
      --out "$OUT/profile_decode.json" >"$OUT/profile_decode.log" 2>&1
  grep -v "^INFO\|^(EngineCore\|DEBUG\|^WARNING\|^\[W" "$OUT/profile_decode.log" | tail -8
  for f in "$OUT"/profile/*_cprofile.txt; do echo "== $f"; sed -n 1,45p "$f" | cut -c1-160; done
  for f in "$OUT"/profile/*_kernels.txt; do echo "== $f"; sed -n 1,22p "$f" | cut -c1-180; done
  if [ "${PROFILE_FAULTS:-1}" = 1 ]; then
    timeout -k 10 "$(left)" python3 benchmarks/fault_test.py --launch --model "$SMOLLM2" --backends INFINITEHIP \
        --faults malformed_json,kv_pressure --pressure-requests 12 --pressure-prompt-tokens 3000 \
        --pressure-new-tokens 512 --pressure-verify 3 \
        --server-args "--max-model-len 8192 --gpu-memory-utilization 0.05 --kv-cache-memory-bytes 300000000 --enforce-eager" \
        --port 8132 --log-dir "$OUT" --out "$OUT/fault.json" >"$OUT/fault.log" 2>&1
  fi
  ;;
*)
  echo "unknown part $part" >&2
  exit 2
  ;;
esac
stamp "done"
for f in build.log pytest_kernels.log; do
  [ -f "$PREP/$f" ] && cp "$PREP/$f" "$OUT/prep_$f"
done
[ -d "$PREP" ] && [ ! -f "$PREP/done" ] && echo "prep has not finished" >>"$OUT/prep_pytest_kernels.log"
kill "$snapper" 2>/dev/null
snapshot
if [ -n "$RETURN" ]; then
  for f in serve_equivalence.json serve_equivalence_noise.json passkey.json passkey.png passkey_sweep.png \
           passkey_configs.json passkey_configs.png \
           fault.json offload_fa.json offload_hip.json load.json profile_decode.json kernels.json; do
    [ -f "$OUT/$f" ] && cp "$OUT/$f" "$RETURN/"
  done
  ls "$RETURN"
fi
for f in "$OUT"/*.log; do echo "== $f"; grep -v "^INFO\|^(EngineCore\|^(APIServer\|DEBUG\|^WARNING" "$f" | tail -12; done
