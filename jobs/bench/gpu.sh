#!/usr/bin/env bash
# The GPU tests and the GPU benchmarks (jobs/bench/gpu.py) on one GPU machine, under 8 minutes, one JSON.
#
# Written for the device tool's machine image: its python3 holds torch 2.11 + torchvision 0.26 (cu130),
# numpy, Pillow, pyarrow, fsspec, pytest; it has no Ray, no pydantic, no moto, raycv is not installed, and
# nothing can be downloaded there. So raycv is imported from this checkout (PYTHONPATH) and nothing is
# pip-installed from the network. The benchmark needs nothing more.
#
# Launch, from the session's checkout root, in ONE call of the device tool (nothing to carry):
#
#     run(command="bash jobs/bench/gpu.sh", timeout_s=540)
#
# and read gpu.json (with gpu_tests.log and bench.log) under the reply's files_at. Put the figures in
# README "Benchmarks" with the card's name (gpu.json: machine.gpu).
#
# The GPU tests (pytest -m gpu) train through Ray Train, so they need ray, pydantic and moto there. Ray
# 2.60's cp312 wheel is 76 MiB, over the tool's 64 MiB carry limit: unless the image gains Ray, the tests
# are reported "not run" in gpu.json with the import error, and the benchmark still runs. Smaller missing
# packages can travel as wheels in .whl/ (device README: `pip download ... -d .whl`, `.whl` in
# .git/info/exclude): then add carry=[".whl"] and this script installs them into /tmp/site, offline.
#
# Locally (any CUDA machine with raycv's environment): bash jobs/bench/gpu.sh  (writes ./gpu.json); a dry
# run of the script on a CPU: GPU_BENCH_ARGS="--device cpu --tiny" OUT=/tmp/gpu bash jobs/bench/gpu.sh
set -euo pipefail

cd "$(dirname "$0")/../.."
out_dir="${OUT:-.}"
py="${PYTHON:-python3}"
limit_s="${GPU_SH_LIMIT_S:-470}" # the whole script; 8 minutes less 10 s of slack
tests_limit_s="${GPU_TESTS_LIMIT_S:-150}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" # raycv from this checkout: it is not installed there
export PYTHONUNBUFFERED=1
mkdir -p "$out_dir"

echo "== GPU"
nvidia-smi -L || echo "nvidia-smi -L failed"
"$py" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available())'

if compgen -G ".whl/*.whl" >/dev/null; then
	echo "== installing the carried wheels in .whl/ into /tmp/site (offline)"
	"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
	export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

echo "== GPU tests"
tests_log="$out_dir/gpu_tests.log"
mapfile -t test_files < <(grep -rl --include='test_*.py' "mark.gpu" tests | sort)
[ "${#test_files[@]}" -gt 0 ] || { echo "no test marked gpu under tests/" >&2; exit 1; }
test_modules=$(printf '%s\n' "${test_files[@]}" | sed 's#/#.#g; s#\.py$##' | paste -sd, -)
# Collecting a test file imports its modules: say which one is missing instead of a collection error.
if missing=$("$py" -c "import importlib, sys
for m in ['ray', 'moto', *'$test_modules'.split(',')]:
    try:
        importlib.import_module(m)
    except Exception as e:
        sys.exit(f'{m}: {type(e).__name__}: {e}')" 2>&1); then
	set +e
	timeout "$tests_limit_s" "$py" -m pytest -q -rs -m gpu -p no:cacheprovider "${test_files[@]}" >"$tests_log" 2>&1
	tests_rc=$?
	set -e
	[ "$tests_rc" = 124 ] && echo "killed after ${tests_limit_s} s (timeout)" >>"$tests_log"
else
	echo "not run: cannot import ${missing##*$'\n'}" >"$tests_log"
	tests_rc="not run: cannot import ${missing##*$'\n'}"
fi
tail -n 5 "$tests_log"

echo "== GPU benchmark"
left=$((limit_s - SECONDS))
budget=$((left - 60)) # room for imports, the decode rows and the last variant past the guard
if [ "$budget" -lt 30 ]; then budget=30; fi
set +e
timeout "$left" "$py" -m jobs.bench.gpu --out "$out_dir/gpu.json" --budget-s "$budget" \
	--tests-log "$tests_log" --tests-rc "$tests_rc" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$out_dir/bench.log"
bench_rc=${PIPESTATUS[0]}
set -e
echo "== done in ${SECONDS} s: tests ${tests_rc}, benchmark exit ${bench_rc}; $out_dir/gpu.json"
exit "$bench_rc"
