#!/usr/bin/env bash
# The GPU speed suite of docs/benchmarks.md ("GPU speed"), in one command, ordered by what matters most,
# under one wall-clock budget: each step gets at most its own limit and what is left of BUDGET_S, so the
# suite always ends in time and every finished step has already written its JSON.
#
#   OUT=results/ BUDGET_S=520 bash benchmarks/gpu_suite.sh
#
# First the GPU tests of the Triton kernel (gpu_tests.txt), then the steps: those that decide issue 8's
# targets first, each with stock segment-anything measured in the same process, then the diagnostics
# (each JSON file is the script's own report, its stdout; log.txt has their stderr). The run of
# 2026-11-26 (docs/benchmarks.md, run A) used this script as of commit 7c24d85; the steps now are:
#   preprocess.json          set_image's host-side preprocessing: Pillow vs torchvision on the GPU
#   train_compile.json       training, batch 8 bf16, compiled: stock, sdpa_fold and triton_relpos (with
#                            channels-last and fused AdamW), profiled
#   latency_compile.json     predictor: stock SAM fp32 + bf16, ZIM plain fp32, ZIM sdpa_fold and
#                            triton_relpos in bf16, channels-last, submodules compiled
#   train_eager.json         training, eager: stock, sdpa_fold, triton_relpos, each also checkpointed
#   latency_graphs.json      predictor: stock, ZIM sdpa_fold with encode_image and decode each compiled
#                            whole under CUDA graphs (reduce-overhead, --compile-scope calls), profiled
#   attention_layer.json     one global attention layer (batch 8, bf16): eager, sdpa_fold, triton_relpos
#                            (autotuned; its chosen tiles), and bias-free flash attention as the ceiling
#   attention_windows.json   the same for a batch of 14x14 windows (the windowed blocks), with sdpa too
#   attention_cudnn.json     the global layer again with cuDNN attention forced for sdpa and sdpa_fold
#   build_forward.json       SA1B-Matte build: the Hiera-B+ converter's forward, bf16, crop 1024,
#                            channels-last and compiled
# A failed Triton test leaves triton_relpos out of every step.
#   report.md                all of the above as Markdown tables, and issue 8's targets checked
#                            (benchmarks/suite_report.py)
#
# SMOKE=1 runs the same steps on the CPU with the tiny model in a 256 frame and no compilation: it only
# checks that the suite runs.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the JSON reports}
BUDGET_S=${BUDGET_S:-520}
mkdir -p "$OUT"
# OUT holds this run's reports only: an earlier run's in a reused OUT must not pass for this one's, also
# those of steps this run skips or leaves out (the Triton steps when its GPU tests fail)
rm -f "$OUT"/*.json "$OUT/report.md"
export PYTHONUNBUFFERED=1
start=$(date +%s)
log="$OUT/log.txt"

if [[ "${SMOKE:-0}" == 1 ]]; then
  layer=(--device cpu --precision fp32 --batch-size 1 --heads 2 --grid 16 --warmup 1 --repeats 2)
  window=(--device cpu --precision fp32 --batch-size 2 --heads 2 --grid 14 --warmup 1 --repeats 2)
  cudnn=auto  # no cuDNN attention on a CPU
  device=cpu
  common=(--model tiny --image-size 256 --device cpu --precision fp32)
  lat=(--warmup 1 --repeats 2)
  train=(--batch-size 2 --warmup 1 --steps 2)
  compile_switch=""
  latency_compile=none
  latency_graphs=none
  build=(--model converter_tiny --device cpu --precision 32 --crop-size 256 --batch-size 2 --repeats 1
         --channels-last)
else
  layer=(--device cuda --precision bf16)
  window=(--device cuda --precision bf16 --batch-size 200 --grid 14)
  cudnn=cudnn
  device=cuda
  common=(--model vit_b --device cuda --precision bf16)
  lat=(--warmup 5 --repeats 30)
  train=(--batch-size 8 --warmup 3 --steps 8)
  compile_switch="+compile"
  latency_compile=default
  latency_graphs=reduce-overhead
  build=(--model converter_hiera_b_plus --device cuda --precision bf16 --crop-size 1024 --batch-size 16
         --repeats 5 --channels-last --compile default)
fi

# step NAME LIMIT_S ARGS...: run one benchmark under min(LIMIT_S, what is left of the budget); skipped
# when less than half its limit is left (a compiling step that starts late measures nothing). The latency,
# training and attention scripts rewrite their JSON after every configuration, so a step cut off by its
# limit keeps what it measured ("complete": false); preprocess and build_forward write theirs at the end.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - start)))
  if ((left < limit / 2)); then
    echo "[suite] $name: skipped, ${left}s of the budget left (needs $((limit / 2))s)" | tee -a "$log"
    return
  fi
  ((left < limit)) && limit=$left
  echo "[suite] $name: up to ${limit}s (t=$(($(date +%s) - start))s)" | tee -a "$log"
  local t0=$(date +%s)
  timeout -k 10 "$limit" python3 "$@" --json-out "$OUT/$name.json" >/dev/null 2>>"$log"
  local rc=$?
  echo "[suite] $name: rc=$rc in $(($(date +%s) - t0))s" | tee -a "$log"
  python3 - "$OUT/$name.json" <<'EOF'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit("    (no JSON report)")
for r in report.get("results", []):
    keep = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()
            if k in ("config", "backend", "error", "images_per_s", "peak_memory_gib", "mfu", "attention_tflops",
                     "alpha_mse_vs_plain_fp32", "relpos_tiles")
            or k.endswith("_ms")}
    if "max_error" in r:
        keep["max_error"] = float(f"{max(r['max_error'].values()):.3g}")
    for k, v in keep.items():
        if isinstance(v, dict) and "median" in v:
            keep[k] = round(v["median"], 2)
    print("   ", keep)
if report.get("complete") is False:
    print("    (cut off: the configurations above are the ones it finished)")
for entry in report.get("sizes", []):
    print("   ", {k: v for k, v in entry.items() if k.endswith("_ms") or k in ("size", "max_level_difference")})
if report.get("relpos_tiles"):
    print("    relpos_tiles:", report["relpos_tiles"])
if "forward" in report:
    print("    forward:", report["forward"])
EOF
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true; } | tee -a "$log"

# The Triton kernel's GPU tests first (outputs and gradients against the float64 reference, autotuned and
# fixed launches): a wrong kernel would make its timings meaningless.
t0=$(date +%s)
tests_limit=$((BUDGET_S < 150 ? BUDGET_S : 150))
timeout -k 10 "$tests_limit" python3 -m pytest tests/test_relpos_flash.py -m gpu -x -p no:cacheprovider \
  >"$OUT/gpu_tests.txt" 2>&1
tests_rc=$?
echo "[suite] gpu_tests: rc=$tests_rc in $(($(date +%s) - t0))s: $(tail -n 1 "$OUT/gpu_tests.txt")" | tee -a "$log"
# A kernel that fails its tests is left out of every step (its timings would mean nothing, and a crash
# in it could end a step's process).
relpos=triton_relpos
if ((tests_rc != 0)); then
  relpos=""
  echo "[suite] the Triton kernel failed its GPU tests: triton_relpos is left out of the steps" | tee -a "$log"
fi
# The other GPU tests (the predictor's prompts copied to the GPU without waiting): seconds
timeout -k 10 60 python3 -m pytest tests -m gpu --deselect tests/test_relpos_flash.py -p no:cacheprovider \
  >>"$OUT/gpu_tests.txt" 2>&1
echo "[suite] other gpu tests: rc=$? $(tail -n 1 "$OUT/gpu_tests.txt")" | tee -a "$log"

# The steps that decide issue 8's targets come first, each with stock segment-anything measured in the
# same process (the issue's condition); the attention-layer diagnostics after them.
# Host-side preprocessing of set_image (Pillow vs torchvision on the device): seconds
step preprocess 40 benchmarks/preprocess_latency.py --device "$device"
# Fine-tuning, compiled: stock, the best measured path (sdpa_fold) and the Triton kernel, after the eager
# sdpa_fold (a few seconds), whose final loss the compiled and Triton paths' must agree with (suite_report)
step train_compile 240 benchmarks/train_throughput.py "${common[@]}" "${train[@]}" \
  --configs "stock,sdpa_fold+cl+fused,sdpa_fold+cl+fused$compile_switch${relpos:+,triton_relpos+cl+fused$compile_switch}" --profile 3
# Interactive latency, submodules compiled: stock (fp32 and bf16), the best measured path, the Triton kernel
step latency_compile 150 benchmarks/predictor_latency.py "${common[@]}" "${lat[@]}" \
  --attention "sdpa_fold${relpos:+,$relpos}" --compile "$latency_compile"
# Activation checkpointing (the 16 GiB target) and the eager paths; +lit: the same step as training runs
# it (ZimModule in a Trainer: host copies, loss checks, metrics), against this script's own loop
step train_eager 120 benchmarks/train_throughput.py "${common[@]}" "${train[@]}" \
  --configs "stock,sdpa_fold+cl+fused,sdpa_fold+cl+fused+lit,sdpa_fold+cl+fused+ckpt${relpos:+,triton_relpos+cl+fused,triton_relpos+cl+fused+ckpt}"
# CUDA graphs: encode_image and decode compiled whole (speed.compile_inference), one replay per call
step latency_graphs 120 benchmarks/predictor_latency.py "${common[@]}" "${lat[@]}" \
  --attention sdpa_fold --compile "$latency_graphs" --compile-scope calls --profile 3
step attention_layer 75 benchmarks/attention_layer.py "${layer[@]}" --backends eager,sdpa_fold,${relpos:+$relpos,}sdpa_nobias
# The windowed blocks (14x14 windows, 25 per image: 200 at batch 8): the fold, the dense-mask sdpa, and
# the Triton kernel with 14 of 16 keys per tile.
step attention_windows 50 benchmarks/attention_layer.py "${window[@]}" --backends eager,sdpa,sdpa_fold${relpos:+,$relpos}
# The same global layer with PyTorch's cuDNN attention forced for the SDPA backends (dense bias,
# unequal widths of the fold): a faster kernel for the existing paths, if cuDNN takes them.
step attention_cudnn 45 benchmarks/attention_layer.py "${layer[@]}" --backends eager,sdpa,sdpa_fold,sdpa_nobias \
  --sdpa-kernel "$cudnn"
step build_forward 90 benchmarks/build_throughput.py "${build[@]}" --skip cpu end_to_end
# The compiled training step as training runs it (last: compiling again costs a minute or so)
step train_lit 150 benchmarks/train_throughput.py "${common[@]}" "${train[@]}" \
  --configs "stock,sdpa_fold+cl+fused,sdpa_fold+cl+fused$compile_switch+lit"
echo "[suite] done in $(($(date +%s) - start))s" | tee -a "$log"
# every figure as Markdown tables and issue 8's targets checked (nothing measured here)
python3 benchmarks/suite_report.py "$OUT" > "$OUT/report.md" 2>>"$log" && tail -n 8 "$OUT/report.md" \
  || { rm -f "$OUT/report.md"; echo "[suite] no report.md (see log.txt)"; }
