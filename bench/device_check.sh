#!/usr/bin/env bash
# The device check (docs/benchmarks.md, "Device check"): one command for a lent GPU, at most
# 9 minutes, every part in its own time box, each part's table printed as soon as it is done.
#
#   bash bench/device_check.sh                  # on the GPU host, from the repository root
#   bash bench/device_check.sh --smoke          # tiny networks on the CPU (tests/test_device_check.py)
#   bash bench/device_check.sh --wheels DIR     # wheels to install first (default: .whl/ if present)
#   bash bench/device_check.sh --budget_s 540   # the whole time box, seconds (default 540;
#                                               # --smoke: 1800, each part's share x 4)
#
# Parts: the machine (bench/environment.py; no GPU and no --smoke: one line, exit 1), the
# R-18 <- R-50x2 step at 224 px (bench/accelerator.py: bf16 at 64 and 128 per device, fp32 at
# 64), the PyTorch AMP bf16 channels-last step (bench/torch_step.py, batches 64 and 128),
# where the time of the fastest bf16 row goes (bench/step_breakdown.py), and the jax exact kNN
# on 262,144 x 4,096 features (bench/exact_knn.py). Each part runs in its own process under
# `timeout`: a part that hangs or runs out of memory costs its own box, not the others'.
# A part's box is the smaller of its share and what is left of the whole; a part with under
# 15 s left is skipped. Exit status 0 when every part finished, else 1.
#
# The wheels: a package the machine lacks (ml_collections) travels as a wheel, installed with
# pip --no-index into a temporary directory put on PYTHONPATH. Prepare them here with
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
# (its needs, absl-py and PyYAML, are on the lent machines). PYTHON names the interpreter
# (default python3).
set -uo pipefail

usage() {  # usage [PROBLEM]: one line on stderr, exit 1
  echo "bench/device_check.sh: ${1:+$1; }usage: bash bench/device_check.sh [--smoke] [--wheels DIR] [--budget_s SECONDS]" >&2
  exit 1
}

smoke=0
wheels=""
budget=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --wheels) [ $# -ge 2 ] || usage "--wheels needs a directory"; wheels="$2"; shift ;;
    --wheels=*) wheels="${1#--wheels=}" ;;
    --budget_s) [ $# -ge 2 ] || usage "--budget_s needs a number of seconds"; budget="$2"; shift ;;
    --budget_s=*) budget="${1#--budget_s=}" ;;
    -h|--help) usage ;;
    *) usage "unknown argument '$1'" ;;
  esac
  shift
done
if [ -z "$budget" ]; then
  budget=$([ "$smoke" = 1 ] && echo 1800 || echo 540)
fi
case "$budget" in
  ''|*[!0-9]*) echo "bench/device_check.sh: --budget_s '$budget' is not a whole number of seconds" >&2
               exit 1 ;;
esac

if [ -n "$wheels" ]; then
  if [ ! -d "$wheels" ]; then
    echo "bench/device_check.sh: --wheels $wheels is not a directory" >&2
    exit 1
  fi
  wheels="$(cd "$wheels" && pwd)"  # the check runs from the repository root
fi
cd "$(dirname "$0")/.." || exit 1
python="${PYTHON:-python3}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
inherited="${PYTHONPATH:-}"
export PYTHONPATH="$PWD${inherited:+:$inherited}"
deadline=$((SECONDS + budget))

echo "# bench/device_check.sh$([ "$smoke" = 1 ] && echo ' --smoke'): $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), time box ${budget} s"

# Wheels: the named directory (an error if it holds none), else .whl/ when it holds some.
if [ -z "$wheels" ] && compgen -G ".whl/*.whl" >/dev/null; then
  wheels=.whl
fi
if [ -n "$wheels" ]; then
  if ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "bench/device_check.sh: --wheels $wheels: no *.whl files there" >&2
    exit 1
  fi
  if ! "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$scratch/site" "$wheels"/*.whl; then
    echo "bench/device_check.sh: pip could not install the wheels of $wheels" >&2
    exit 1
  fi
  # Ahead of the machine's own packages: a carried wheel is the version asked for.
  export PYTHONPATH="$PWD:$scratch/site${inherited:+:$inherited}"
  echo "# installed for this run from $wheels: $("$python" -c 'import importlib.metadata as m, sys
print(", ".join(sorted(d.name + " " + d.version for d in m.distributions(path=[sys.argv[1]]))))' \
    "$scratch/site")"
fi
if ! "$python" -c 'import ml_collections' 2>/dev/null; then
  echo "bench/device_check.sh: ml_collections is not importable; carry its wheel (.whl/, see docs/benchmarks.md)" >&2
  exit 1
fi

# The smoke run: the same parts on tiny networks; its step rows are float32 only, since
# XLA:CPU compiles the bfloat16 step slowly (tests/test_accelerator_bench.py tests bf16).
# XLA:CPU compiles slowly on a loaded machine: there each share is 4 times longer (the
# whole time box stays --budget_s).
if [ "$smoke" = 1 ]; then
  step_rows=float32:2; torch_batches=2; breakdown_dtype=float32; smoke_flags=(--smoke)
  share_scale=4
else
  step_rows=bfloat16:64,bfloat16:128,float32:64; torch_batches=64,128
  breakdown_dtype=bfloat16; smoke_flags=(); share_scale=1
fi
failed=()

# run_part NAME SHARE_S COMMAND...: COMMAND under `timeout`, its box min(SHARE_S, time left).
run_part() {
  local name="$1" share=$(($2 * share_scale)); shift 2
  local left=$((deadline - SECONDS))
  local box=$((share < left ? share : left))
  echo
  echo "## $name"
  if [ "$box" -lt 15 ]; then
    echo "# skipped: ${left} s left of the ${budget} s time box"
    failed+=("$name (skipped)")
    return
  fi
  local began=$SECONDS
  timeout -k 10 "$box" "$@"
  local status=$?
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "# stopped at its time box of ${box} s"
    failed+=("$name (time box)")
  elif [ "$status" -ne 0 ]; then
    echo "# failed: exit status $status"
    failed+=("$name (exit $status)")
  fi
  echo "# part done in $((SECONDS - began)) s"
}

echo
echo "## The machine"
if [ "$smoke" = 1 ]; then
  timeout -k 5 60 "$python" -m bench.environment || { echo "# bench/environment.py failed" >&2; exit 1; }
else
  timeout -k 5 90 "$python" -m bench.environment --require_accelerator || exit 1
fi

# Shares (s) of the 540 s: step 230 (no new row after 150 s), PyTorch 80, breakdown 110,
# kNN 90; the machine's part takes the rest (JAX's start on the GPU).
run_part "BINGO step, JAX (bench/accelerator.py)" 230 \
  "$python" -m bench.accelerator "${smoke_flags[@]}" --rows "$step_rows" --no_torch \
  --budget_minutes 2.5 --json_out "$scratch/step.json"
if "$python" -c 'import torch' 2>/dev/null; then
  run_part "BINGO step, PyTorch (bench/torch_step.py)" 80 \
    "$python" -m bench.torch_step "${smoke_flags[@]}" --batches "$torch_batches" \
    --budget_s 50
else
  echo; echo "## BINGO step, PyTorch (bench/torch_step.py)"
  echo "# skipped: torch is not importable by $python"
  failed+=("PyTorch step (no torch)")
fi
run_part "Where the time goes (bench/step_breakdown.py)" 110 \
  "$python" -m bench.step_breakdown "${smoke_flags[@]}" --dtype "$breakdown_dtype" \
  --step_json "$scratch/step.json"
run_part "Exact kNN, jax backend (bench/exact_knn.py)" 90 \
  "$python" -m bench.exact_knn "${smoke_flags[@]}" --budget_s 35

echo
if [ ${#failed[@]} -eq 0 ]; then
  echo "# device check done in ${SECONDS} s, every part finished"
  exit 0
fi
echo "# device check done in ${SECONDS} s; not finished: $(IFS=';'; echo "${failed[*]}")"
exit 1
