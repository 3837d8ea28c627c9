#!/usr/bin/env bash
# Every GPU measurement of embedcache in one run, for the first machine with a GPU (about 8 minutes on one
# H100): extraction of a ViT-L/16-sized random-init model (ceiling / pipeline / naive loop) at fp16 and
# bf16, the probes against scikit-learn, the scaling study against scikit-learn on the same fits, and the
# fine-tune speed from cached tail tokens. Each benchmark writes its JSON under --out with the device named
# (torch.cuda.get_device_name); gpu_suite.json lists them with nvidia-smi's line and the wall time of each.
#
#   bash benchmarks/gpu_suite.sh                      # on the GPU machine; commit benchmarks/results/gpu/
#   bash benchmarks/gpu_suite.sh --dry-run --out DIR  # on a CPU: the same steps at tiny sizes (a test runs it)
#
# --dry-run runs on the CPU with a tiny random-init ViT and float32 / bfloat16 (a CPU has no fast fp16),
# so that every step, flag and output path is exercised before a GPU's minutes are spent.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
out=benchmarks/results/gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    *) echo "gpu_suite.sh: unknown argument '$1' (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$dry" = 1 ]; then
  device=cpu; dtypes="float32 bfloat16"; vit=timm:test_vit; tune_model=timm:test_vit
  extract_n=32; batch=16; probe_n=600; probe_d=32; study_n=2000; study_limits=64; study_seeds=1
  budget=5; timeout=30; tune_cells=32; tune_epochs=1
  probe_extra="--only logistic --skip-sklearn-svm"; study_probes=logistic
else
  device=cuda; dtypes="float16 bfloat16"; vit=timm:vit_large_patch16_224; tune_model=timm:vit_base_patch16_224
  extract_n=4096; batch=256; probe_n=50000; probe_d=1024; study_n=185000; study_limits=256..16384; study_seeds=5
  budget=120; timeout=120; tune_cells=4000; tune_epochs=2
  probe_extra=""; study_probes=""
  python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_suite.sh: no CUDA device here; run with --dry-run on a CPU" >&2; exit 1; }
fi

mkdir -p "$out"
steps="$out/steps.tsv"
: > "$steps"
run() {  # run NAME COMMAND...: time one step, keep going if it fails (its status is recorded)
  local name="$1"; shift
  local t0=$SECONDS status=0
  echo "== $name: $*"
  "$@" || status=$?
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >> "$steps"
}

for dtype in $dtypes; do
  run "extract-$dtype" python benchmarks/extract_throughput.py --model "$vit" --n "$extract_n" \
    --batch-size "$batch" --device "$device" --dtype "$dtype" --json "$out/extract_throughput-$dtype.json"
done
run probes python benchmarks/probe_speed.py --n "$probe_n" --d "$probe_d" --device "$device" \
  --timeout "$timeout" --repeats 1 --out "$out/probe_speed.json" $probe_extra
run study python benchmarks/study_speed.py --n "$study_n" --d "$probe_d" --limits "$study_limits" \
  --seeds "$study_seeds" --device "$device" --sklearn-budget "$budget" --out "$out/study_speed.json" \
  ${study_probes:+--probes "$study_probes"}
run finetune python benchmarks/finetune_speed.py --model "$tune_model" --cells "$tune_cells" \
  --epochs "$tune_epochs" --device "$device" --dtype bfloat16 --out "$out/finetune_speed.json"

python - "$out" "$dry" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
steps = [dict(zip(("step", "status", "seconds"), line.split("\t"))) for line in (out / "steps.tsv").read_text().splitlines()]
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout.strip()
except (OSError, subprocess.CalledProcessError):
    smi = None
summary = {
    "benchmark": "gpu_suite", "dry_run": dry, "nvidia_smi": smi, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    "steps": [{**s, "status": int(s["status"]), "seconds": int(s["seconds"])} for s in steps],
    "results": sorted(p.name for p in out.glob("*.json") if p.name != "gpu_suite.json"),
}
(out / "gpu_suite.json").write_text(json.dumps(summary, indent=2))
failed = [s["step"] for s in summary["steps"] if s["status"]]
print(f"gpu_suite: {len(steps)} steps, failed: {', '.join(failed) or 'none'}; {out / 'gpu_suite.json'}")
sys.exit(1 if failed else 0)
EOF
