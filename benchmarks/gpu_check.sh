#!/usr/bin/env bash
# The prepared GPU check: on a bare GPU machine, from the repository root,
#
#   bash benchmarks/gpu_check.sh                      # every phase, in order
#   bash benchmarks/gpu_check.sh --only tests bench   # some phases again (after a fix)
#   bash benchmarks/gpu_check.sh --dry-run            # print the commands, run nothing
#   bash benchmarks/gpu_check.sh --budget 540 --archive /some/dir/gpu_results.tar.gz
#
# Phases: versions (GPU, driver, torch, triton, nvcc), build (the extension with CUDA for the GPU
# present), tests (every `gpu` test, fail-fast, then the parity check; the FSDP smoke test is one
# of the gpu tests), bench (kernel benchmarks), e2e (the end-to-end training step, and the data
# loader against it), profile (where the time goes: the training step's kernels, python -m
# fastlm.bench.profile_step; each kernel benchmark's host, wall and device time and its kernels,
# python -m fastlm.bench.profile_ops; the Triton compile report, in parallel processes:
# benchmarks/compile_report_parallel.py). Results and a log go to benchmarks/results/cuda-<gpu>/
# (FASTLM_RESULTS overrides); each run merges its benchmarks into summary.json. Each command has
# its own time limit (seconds: FASTLM_<PHASE>_TIMEOUT; FASTLM_PARITY_TIMEOUT and
# FASTLM_LOADER_TIMEOUT for the second command of tests and e2e; FASTLM_PROFILE_OPS_TIMEOUT,
# default 150, and FASTLM_COMPILE_REPORT_TIMEOUT, default 120, for the second and third of
# profile; FASTLM_BENCH_EACH_TIMEOUT for each kernel benchmark within the bench phase); at it the
# command gets SIGINT, as from Ctrl-C, so pytest still reports and the benchmark runner still
# writes the rows that finished. --budget S (default 480) caps the whole run: a command gets at
# most what is left of it, and one that would start with under 30 s left is skipped and reported,
# so the run ends inside the GPU window with every finished phase's results. --archive FILE
# writes the results folder as a .tar.gz after each phase (one file to bring back from the
# machine). At the end it prints the issue's targets judged from the results
# (python -m fastlm.bench.targets). The gpu tests run in
# parallel processes (pytest-xdist, FASTLM_TEST_WORKERS, default 8: Triton compiles are CPU-bound)
# with a per-test timeout (pytest-timeout), stopping after FASTLM_MAXFAIL (default 20) failures: a
# few failing tests still let the rest run (the whole suite takes about 3 minutes), a broken kernel
# or build still stops it early.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_PHASES=(versions build tests bench e2e profile)
phases=()
dry_run=0
budget=${FASTLM_GPU_BUDGET:-480}
archive=""
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --budget) shift; [[ "${1:-}" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: error: --budget needs seconds, got '${1:-}'" >&2; exit 2; }
      budget=$1 ;;
    --archive) shift; [[ -n "${1:-}" ]] || { echo "gpu_check.sh: error: --archive needs a file name" >&2; exit 2; }
      archive=$1 ;;
    --only) shift; while (($#)) && [[ "$1" != --* ]]; do phases+=("$1"); shift; done; continue ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown argument '$1' (phases: ${ALL_PHASES[*]})" >&2; exit 2 ;;
  esac
  shift
done
((${#phases[@]})) || phases=("${ALL_PHASES[@]}")
for phase in "${phases[@]}"; do
  [[ " ${ALL_PHASES[*]} " == *" $phase "* ]] || {
    echo "gpu_check.sh: error: unknown phase '$phase' (phases: ${ALL_PHASES[*]})" >&2; exit 2; }
done

# The Python that holds torch: $PYTHON, else python3 (the one GPU images ship; `python` may be absent).
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
if ((dry_run)); then
  gpu_slug="cuda-<gpu>"
  arch="<sm>"
else
  gpu_slug=$($PYTHON -c "import re, torch; print('cuda-' + re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))") || {
    echo "gpu_check.sh: error: no CUDA device visible to torch" >&2; exit 2; }
  arch=$($PYTHON -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}')")
fi
RESULTS=${FASTLM_RESULTS:-benchmarks/results/$gpu_slug}
failed=()

run() {  # run PHASE TIMEOUT COMMAND...: one command of a phase, timed, logged, inside the budget
  local phase=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  ((limit > left - 25)) && limit=$((left - 25))  # room for the SIGKILL grace within the budget
  echo "+ [$phase, limit ${limit}s] $*"
  ((dry_run)) && return 0
  if ((limit < 30)); then
    echo "= [$phase] skipped: ${left} s of the ${budget} s budget left"
    failed+=("$phase (skipped, budget): $*")
    return 1
  fi
  local start=$SECONDS
  # SIGINT at the limit, as Ctrl-C: pytest then prints its failures and writes its JUnit report,
  # and the benchmark runner writes the rows that finished; SIGKILL 20 s later if still running.
  timeout -s INT --kill-after=20 "$limit" "$@"
  local status=$?
  echo "= [$phase] exit $status after $((SECONDS - start)) s$( ((status == 124)) && echo " (time limit: stopped)")"
  ((status == 0)) || failed+=("$phase: $*")
  return $status
}

save_archive() {  # the results folder as one .tar.gz (written beside, then renamed)
  [[ -n "$archive" ]] && ((!dry_run)) || return 0
  mkdir -p "$(dirname "$archive")"
  tar czf "$archive.part" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" && mv "$archive.part" "$archive"
}

pytest_args=(-m gpu -q -p no:cacheprovider -rfE --maxfail="${FASTLM_MAXFAIL:-20}" --junitxml="$RESULTS/gpu_tests.xml")
if ((dry_run)) || $PYTHON -c "import xdist" 2>/dev/null; then
  pytest_args+=(-n "${FASTLM_TEST_WORKERS:-8}")
fi
if ((dry_run)) || $PYTHON -c "import pytest_timeout" 2>/dev/null; then
  pytest_args+=(--timeout "${FASTLM_TEST_TIMEOUT:-240}")
fi

if ((!dry_run)); then
  mkdir -p "$RESULTS"
  exec > >(tee -a "$RESULTS/gpu_check.log") 2>&1
  echo "=== gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'): phases ${phases[*]} -> $RESULTS"
fi

for phase in "${phases[@]}"; do
  echo "=== phase: $phase"
  case "$phase" in
    versions)
      run versions 60 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
      run versions 60 $PYTHON -c "import torch, triton, sys; print(f'python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, device {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}')"
      run versions 60 nvcc --version
      ;;
    build)
      run build "${FASTLM_BUILD_TIMEOUT:-300}" env FASTLM_BUILD_CUDA=1 FASTLM_CUDA_ARCHS="$arch" MAX_JOBS="$(nproc 2>/dev/null || echo 8)" \
        $PYTHON -m pip install --no-build-isolation --no-deps -q -e .
      run build 120 $PYTHON -c "import torch, fastlm.ops as ops; from fastlm import _ext; m = _ext.extension(warn=False); assert m is not None and m.with_cuda(), _ext.extension_status(); r = ops.available_backends('cuda'); print(r); bad = {op: r[op][b] for op, b in (('cross_entropy', 'triton'), ('causal_attention', 'triton'), ('layer_norm', 'triton'), ('adamw', 'cuda')) if r[op][b]}; assert not bad, bad"
      ;;
    tests)
      run tests "${FASTLM_TESTS_TIMEOUT:-300}" $PYTHON -m pytest "${pytest_args[@]}" tests
      # Parity is about the kernels' arithmetic, not their tile sizes (each config has its own test).
      run tests "${FASTLM_PARITY_TIMEOUT:-180}" env FASTLM_AUTOTUNE=0 $PYTHON -m fastlm.bench --parity --device cuda --out-dir "$RESULTS"
      ;;
    bench)
      # Each benchmark has its own limit inside the phase's (rows that finished are kept), so a slow
      # one cannot starve the others; attention, the one that tunes most, goes first.
      run bench "${FASTLM_BENCH_TIMEOUT:-300}" $PYTHON -m fastlm.bench --device cuda --only attention cross_entropy adamw norm \
        --timeout "${FASTLM_BENCH_EACH_TIMEOUT:-130}" --out-dir "$RESULTS"
      ;;
    e2e)
      run e2e "${FASTLM_E2E_TIMEOUT:-300}" $PYTHON -m fastlm.bench --device cuda --only e2e --out-dir "$RESULTS"
      run e2e "${FASTLM_LOADER_TIMEOUT:-120}" $PYTHON benchmarks/data_throughput.py --device cuda --corpus_mb 20 --workers 8  # loader vs step
      ;;
    profile)  # where a step's time goes: the evidence for the targets the numbers miss
      run profile "${FASTLM_PROFILE_TIMEOUT:-180}" $PYTHON -m fastlm.bench.profile_step --device cuda --out-dir "$RESULTS"
      run profile "${FASTLM_PROFILE_OPS_TIMEOUT:-150}" $PYTHON -m fastlm.bench.profile_ops --device cuda --out-dir "$RESULTS"
      # One process per dtype and head size: in one process the ~115 compiles outlasted 111 s on an H200 machine.
      run profile "${FASTLM_COMPILE_REPORT_TIMEOUT:-120}" $PYTHON benchmarks/compile_report_parallel.py --arch "$arch" \
        --out "$RESULTS/compile_report.txt"
      ;;
  esac
  save_archive
done

# The issue's targets judged from every benchmark in the results so far (a second or two).
if ((!dry_run)) && [[ -f "$RESULTS/summary.json" ]]; then
  echo "=== targets"
  $PYTHON -m fastlm.bench.targets "$RESULTS" || failed+=("targets: python -m fastlm.bench.targets $RESULTS")
  save_archive
fi

if ((${#failed[@]})); then
  echo "=== gpu_check: ${#failed[@]} command(s) failed:"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "=== gpu_check: done (${phases[*]}); results in $RESULTS"
