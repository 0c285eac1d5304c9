#!/usr/bin/env bash
# The GPU suite (CUDA kernel tests, then the benchmarks) in timed stages, on any CUDA machine.
# From the repository root:
#
#   bash benchmarks/run_gpu_suite.sh SECONDS STAGE [STAGE ...]
#
# runs the stages in order within SECONDS in all (each is stopped with SIGINT when the time is
# up, so pytest still writes what it measured; results.json is also rewritten after every row).
# Stages:
#   check    environment, then the CUDA kernel tests (tests/kernels: interpreter suites on CUDA,
#            COCO-shape parity of every loss, the sm_90 compile check), at most CHECK_SECONDS
#            (default 300) so that the benchmark stages after it keep their time
#   sanitize the interpreter-shape kernel tests (no fuzzing) under compute-sanitizer memcheck:
#            out-of-bounds or misaligned accesses that the interpreter cannot see
#   targets  RetinaNet shapes, bf16: the target workloads (FAMKD with FULL_METHOD, with and
#            without generators), every provider
#   logits   RetinaNet shapes, bf16: logits (sigmoid, softmax + liger peer), MGD, FGD, every provider
#   defaults RetinaNet shapes, bf16: FAMKD with its own defaults, every provider
#   rest     every other case and float32, without torch.compile (eager, triton, liger)
#   compile  every other case and float32, torch.compile only (long: compiles per shape)
# One command can run every stage, given SECONDS enough; in commands of under 10 minutes each:
# (1) 580 check targets  (2) 580 logits defaults  (3) 500 rest sanitize  (4) 580 compile.
# Each stage leaves <stage>.tar.gz (its results folder and log) and <stage>.log in $OUT
# (default /tmp/famkd_out). Copy the tarballs to one folder on the machine that holds the
# checkout, then benchmarks/collect_gpu_results.sh FOLDER merges them into
# benchmarks/results/<device>/.
#
# Wheels in .whl/ are installed first (into /tmp/site, without the package index): that is how
# liger-kernel reaches a machine that cannot install it; see benchmarks/README.md.
set -uo pipefail
total=${1:?usage: run_gpu_suite.sh SECONDS STAGE [STAGE ...]}
shift
out=${OUT:-/tmp/famkd_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
start=$(date +%s)
left() { echo $(( total - ($(date +%s) - start) )); }

bench() {  # bench STAGE PYTEST-ARGS...
    local stage=$1
    shift
    timeout -s INT -k 20 "$(( $(left) - 15 ))" python3 -m pytest benchmarks/ -q -p no:cacheprovider \
        --bench-out "$out/$stage" "$@"
}

for stage in "$@"; do
    if (( $(left) < 45 )); then
        echo "[gpu-suite] no time left for $stage" | tee -a "$out/$stage.log"
        continue
    fi
    echo "[gpu-suite] $stage: $(left) s left" | tee "$out/$stage.log"
    mkdir -p "$out/$stage"
    case $stage in
        check)
            {
                nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
                python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"
                git rev-parse --short HEAD 2>/dev/null || true
                cap=$(( $(left) - 15 )); (( cap > ${CHECK_SECONDS:-300} )) && cap=${CHECK_SECONDS:-300}
                timeout -s INT -k 20 "$cap" python3 -m pytest tests/kernels -q -p no:cacheprovider -n 8 \
                    --junitxml "$out/$stage/junit.xml" -r fEs
            } 2>&1 | tee -a "$out/$stage.log"
            ;;
        sanitize)
            {
                cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
                PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT -k 20 "$(( $(left) - 15 ))" \
                    "$cs" --tool memcheck --report-api-errors no --error-exitcode 99 \
                    python3 -m pytest -q -p no:cacheprovider -x -k "not fuzz and not aot and not cuda_parity" \
                    tests/kernels/test_logits_kl.py tests/kernels/test_reconstruction.py tests/kernels/test_teacher_stats.py
                echo "[gpu-suite] compute-sanitizer exit code $?"
            } 2>&1 | tee -a "$out/$stage.log"
            ;;
        targets)
            bench targets --bench-cases retinanet_coco_b2 --bench-dtypes bfloat16 \
                --bench-workloads famkd_feature_nogen,famkd_full 2>&1 | tee -a "$out/$stage.log"
            ;;
        logits)
            bench logits --bench-cases retinanet_coco_b2 --bench-dtypes bfloat16 \
                --bench-workloads logits,logits_softmax,mgd,fgd 2>&1 | tee -a "$out/$stage.log"
            ;;
        defaults)
            bench defaults --bench-cases retinanet_coco_b2 --bench-dtypes bfloat16 \
                --bench-workloads famkd_default_nogen,famkd_default_full 2>&1 | tee -a "$out/$stage.log"
            ;;
        rest)
            bench rest --bench-cases all --bench-dtypes bfloat16,float32 --bench-providers eager,triton,liger 2>&1 \
                | tee -a "$out/$stage.log"
            ;;
        compile)
            bench compile --bench-cases all --bench-dtypes bfloat16,float32 --bench-providers compile,compile_triton 2>&1 \
                | tee -a "$out/$stage.log"
            ;;
        *)
            echo "[gpu-suite] unknown stage $stage" | tee -a "$out/$stage.log"
            ;;
    esac
    tar -czf "$out/$stage.tar.gz" -C "$out" "$stage" "$stage.log"
    rm -rf "${out:?}/$stage"
    echo "[gpu-suite] $stage done, $(left) s left"
done
