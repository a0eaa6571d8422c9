#!/usr/bin/env bash
# NoProp's GPU check, from a bundle made by `cargo xtask gpu-bundle`.
#
# For a node with an NVIDIA driver, CUDA 13's runtime libraries inside a
# Python environment (a PyTorch cu13x one has them) and no Rust and no
# network. It runs, in this order, each step under its own time limit and
# within one overall budget:
#   selftest   noprop selftest: every op on the device against the CPU
#   dt         one NoProp-DT epoch on MNIST (full set; 5 stochastic runs
#              and the deterministic one, as the shipped config says)
#   bench      noprop bench: one block's training step and T = 10 inference
#   torch-step torch_reference.py step (same model, same batch)
#   torch-dt   torch_reference.py train --epochs 1
#   ct, fm     one NoProp-CT and one NoProp-FM epoch (1 stochastic run and
#              the deterministic one, 1000 steps)
# and writes summary.json (one object: the device, each step's exit status,
# time and figures, and the ratios beside PyTorch) plus every step's log.
#
# usage: run.sh [--device cuda|cpu] [--quick] [--out DIR] [--python PY]
#               [--budget SECONDS] [--threads N]
#   --device   cuda (default); cpu for a dry run of the whole sequence
#   --quick    tiny limits (256 training images, 200 test images, 20
#              inference steps for CT/FM): a dry run in a few minutes on CPU
#   --out DIR  where logs, run folders and summary.json go ($OUT, else ./out)
#   --python   the Python with torch (and CUDA 13's pip libraries); default
#              $PYTHON, else python3
#   --budget   seconds for the whole run (default 470); a step that would
#              pass it is cut short and marked so
#   --threads  CPU threads for noprop and torch (default: all cores)
# Environment: NOPROP_CUDA_LIB, a ':'-separated list of folders holding
# libcudart.so.13, libcublas.so.13, libcublasLt.so.13 and libcurand.so.10, if
# the Python environment does not have them.
set -u -o pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
device=cuda
quick=0
out=${OUT:-$here/out}
py=${PYTHON:-python3}
budget=470
threads=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=${2:?--device needs a value}; shift 2 ;;
        --quick) quick=1; shift ;;
        --out) out=${2:?--out needs a value}; shift 2 ;;
        --python) py=${2:?--python needs a value}; shift 2 ;;
        --budget) budget=${2:?--budget needs a value}; shift 2 ;;
        --threads) threads=${2:?--threads needs a value}; shift 2 ;;
        -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$device" in cuda|cpu) ;; *) echo "run.sh: --device $device: expected cuda or cpu" >&2; exit 2 ;; esac
case "$budget" in ''|*[!0-9]*) echo "run.sh: --budget $budget: expected whole seconds" >&2; exit 2 ;; esac
command -v "$py" >/dev/null 2>&1 || { echo "run.sh: no Python at $py (pass --python)" >&2; exit 2; }
mkdir -p "$out" || { echo "run.sh: cannot create $out" >&2; exit 2; }
out=$(cd "$out" && pwd)
data="$here/data/mnist"
# The binary travels gzipped (its CUDA kernels are text and shrink 4-fold):
# unpacked into a temporary folder, removed at exit.
bin="$here/bin/noprop"
if [ ! -x "$bin" ] && [ -f "$here/bin/noprop.gz" ]; then
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/noprop-bundle.XXXXXX") || { echo "run.sh: cannot make a temporary folder" >&2; exit 2; }
    trap 'rm -rf "$tmp"' EXIT
    gzip -dc "$here/bin/noprop.gz" >"$tmp/noprop" && chmod +x "$tmp/noprop" ||
        { echo "run.sh: cannot unpack $here/bin/noprop.gz into $tmp" >&2; exit 2; }
    bin="$tmp/noprop"
fi
[ -x "$bin" ] || { echo "run.sh: $here/bin/noprop(.gz) is missing or not executable" >&2; exit 2; }

# CUDA 13's runtime libraries: the Python environment's nvidia/cu13/lib (pip
# wheels, as PyTorch cu13x installs them), torch/lib, then NOPROP_CUDA_LIB.
libs=$("$py" - <<'EOF' 2>/dev/null
import importlib.util, os
found = []
try:
    import nvidia
    for root in list(nvidia.__path__):
        for sub in ("cu13/lib", "cublas/lib", "cuda_runtime/lib", "curand/lib", "cuda_nvrtc/lib"):
            d = os.path.join(root, sub)
            if os.path.isdir(d):
                found.append(d)
except Exception:
    pass
spec = importlib.util.find_spec("torch")
if spec and spec.submodule_search_locations:
    for root in spec.submodule_search_locations:
        d = os.path.join(root, "lib")
        if os.path.isdir(d):
            found.append(d)
print(":".join(found))
EOF
)
export LD_LIBRARY_PATH="${NOPROP_CUDA_LIB:+$NOPROP_CUDA_LIB:}${libs:+$libs:}${LD_LIBRARY_PATH:-}"
missing=$(ldd "$bin" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')

started=$(date +%s)
steps="$out/steps.tsv"
printf 'step\texit\tseconds\tnote\n' >"$steps"

# step NAME LIMIT COMMAND...: runs COMMAND with stdout in NAME.out and stderr
# in NAME.log, under min(LIMIT, what is left of the budget); records the exit
# status and seconds (124 = cut short by its limit).
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - ($(date +%s) - started)))
    if [ "$left" -lt 10 ]; then
        printf '%s\t-\t0\tskipped: the budget of %ss is spent\n' "$name" "$budget" >>"$steps"
        echo "[$name] skipped: budget spent" >&2
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "[$name] (limit ${limit}s) $*" >&2
    local t0 rc
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.out" 2>"$out/$name.log"
    rc=$?
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    local note=""
    [ "$rc" -eq 124 ] && note="cut short at its limit of ${limit}s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$note" >>"$steps"
    echo "[$name] exit $rc in ${secs}s" >&2
}

skip() {
    printf '%s\t-\t0\tskipped: %s\n' "$1" "$2" >>"$steps"
    echo "[$1] skipped: $2" >&2
}

thr=()
[ -n "$threads" ] && thr=(--threads "$threads")
train_args=(--device "$device" --epochs 1 --data "$data" --json "${thr[@]}")
bench_args=(--device "$device" --json "${thr[@]}")
torch_args=(--device "$device" --data "$data")
[ -n "$threads" ] && torch_args+=(--threads "$threads")
configs="$here/configs"
if [ "$quick" = 1 ]; then
    train_args+=(--train-limit 256 --test-limit 200)
    bench_args+=(--steps 3 --warmup 1 --op-reps 1 --fused-steps 1 --infer-batch 100)
    torch_step_args=(--steps 3 --warmup 1)
    # torch_reference.py has no test limit: its 10k-image evaluation on a CPU
    # takes minutes.
    torch_train_args=(--train-limit 256)
    torch_dt_limit=400
    # CT and FM infer with `steps` network calls; 20 instead of 1000.
    configs="$out/quick-configs"
    mkdir -p "$configs"
    for f in "$here"/configs/*.toml; do
        sed 's/^steps = 1000\b/steps = 20/' "$f" >"$configs/$(basename "$f")"
    done
    for m in ct fm; do
        grep -q '^steps = 20' "$configs/mnist-$m-onehot.toml" ||
            { echo "run.sh: configs/mnist-$m-onehot.toml has no 'steps = 1000' line to shorten" >&2; exit 2; }
    done
else
    torch_step_args=()
    torch_train_args=()
    torch_dt_limit=180
fi

if [ -n "$missing" ]; then
    for s in selftest dt bench ct fm; do skip "$s" "bin/noprop cannot load $missing(set NOPROP_CUDA_LIB)"; done
else
    step selftest 120 "$bin" selftest --device "$device" --json "${thr[@]}"
    step dt 240 "$bin" train --config "$configs/mnist-dt-onehot.toml" --out "$out/runs/dt" "${train_args[@]}"
    step bench 90 "$bin" bench "${bench_args[@]}"
fi
if "$py" -c 'import torch' >/dev/null 2>&1; then
    step torch-step 90 "$py" "$here/torch_reference.py" step "${torch_args[@]}" "${torch_step_args[@]}"
    step torch-dt "$torch_dt_limit" "$py" "$here/torch_reference.py" train --epochs 1 "${torch_args[@]}" "${torch_train_args[@]}"
else
    skip torch-step "$py cannot import torch"
    skip torch-dt "$py cannot import torch"
fi
if [ -z "$missing" ]; then
    step ct 150 "$bin" train --config "$configs/mnist-ct-onehot.toml" --out "$out/runs/ct" --eval-runs 1 "${train_args[@]}"
    step fm 150 "$bin" train --config "$configs/mnist-fm-onehot.toml" --out "$out/runs/fm" --eval-runs 1 "${train_args[@]}"
fi

# Checkpoints stay here; what comes back is metrics, configs and logs.
rm -rf "$out"/runs/*/checkpoints "$out"/runs/*/embed-init.safetensors
command -v nvidia-smi >/dev/null 2>&1 &&
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader >"$out/gpu.txt" 2>&1
"$py" "$here/summarize.py" --out "$out" --device "$device" --quick "$quick" --missing "$missing" \
    --seconds "$(($(date +%s) - started))" --budget "$budget" >"$out/summary.json" ||
    { echo "run.sh: summarize.py failed" >&2; exit 1; }
cat "$out/summary.json"
[ -z "$missing" ] || { echo "run.sh: $bin cannot load $missing(set NOPROP_CUDA_LIB)" >&2; exit 1; }
# Non-zero when a step failed or was cut short (skips for a missing torch are not failures).
awk -F'\t' 'NR > 1 && $2 != "-" && $2 != 0 { bad = 1 } END { exit bad }' "$steps"
