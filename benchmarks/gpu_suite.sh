#!/usr/bin/env bash
# The GPU checks and benchmarks behind the committed results, in stages that each fit one
# 10-minute command of the device tool (see benchmarks/NOTES.md). Run from the repo root:
#
#   OUT=/some/folder bash benchmarks/gpu_suite.sh STAGE
#
# Results (JSON) land in $OUT/<gpu-name>/, logs in $OUT/<stage>-*.log; the kernels' tuning
# cache in $OUT/autotune.json. Each step has its own time limit so one hang cannot eat the rest.
# Stages:
#   tests     pytest -m gpu over the kernels' GPU tests
#   biotite   first of two calls for tests-model: biotite and biotraj (44 MB, carry .whl3) into
#             /tmp/site; the next call must find the machine still warm
#   tests-model pytest -m gpu over the other GPU test files: model, CUDA graphs, profiler, loader,
#             trainer (carry .whl with zarr's wheels and gemmi's: the loader imports zarr, the
#             trainer test's prediction step gemmi and, installed by the biotite stage, biotite)
#   kernels   benchmarks/kernels.py --quick (OPS=evo_attention,pair by default; MEGAFOLD_AUTOTUNE=1
#             tunes and leaves the choices in $OUT/autotune.json)
#   whole     benchmarks/trunk.py (eager, triton, cueq, compile at N=384, 768; triton and cueq also
#             with the step replayed as a CUDA graph) and
#             benchmarks/train_step.py (paper, crop 384, torch / triton / compile)
#   dashboard benchmarks/dashboard_screenshot.py (paper, crop 384, torch vs triton, longest crops)
#   datawait  a "small" training step's wait for data: precache vs parsing + search on the fly
#   step      benchmarks/train_step.py, "paper" at crop 384, torch vs triton only (compile's row
#             needs a stage of its own: compiling every block took over 240 s)
#   compile   benchmarks/train_step.py, torch, triton and torch.compile of the whole model in one
#             run, 2 steps each (the H100 run took 473 s, most of it compiling)
#   multigpu  (a 2-GPU machine) the NCCL equivalence test and benchmarks/multigpu.py
#   dap       (a 2-GPU machine) the sharded trunk's test and benchmarks/dap.py (longest crops)
#   dap-longest (a 2-GPU machine) the DDP test and the longest crops on 1 and 2 GPUs at 79.2 GiB each
#   trace     benchmarks/step_trace.py: GPU busy time, launches and top kernels of a "paper" step
#   host      benchmarks/host_profile.py: where a "paper" step's host (Python) time goes (cProfile)
#   longest   the trunk's longest crop: triton from 1536, then with pair_offload from 2048
#   curve     benchmarks/learning_curve.py (10 training minutes; pauses at the wall budget,
#             then `curve-resume` continues it on the same machine)
#   retune-evo       MEGAFOLD_AUTOTUNE=force over the triangle-shape EvoAttention keys at N=384,
#             768 (every candidate's time in $OUT/autotune-trials.json), then their rows
#   retune-triangle  the same for triangle multiplication (its one-stage input candidates)
#   overhead  benchmarks/profiler_overhead.py: the profiler's hooks-only cost on a "paper" step at
#             crop 384 and its traced mode's against the training step, training, plain,
#             profiled and graphed-diffusion runs alternating, every step's time
#   launch    launch_kernel's direct launches against Triton's own path: host_overhead.py (plain
#             pair-bias calls), then a "paper" training step (crop 384, triton) with
#             MEGAFOLD_FAST_LAUNCH=0, =1, =0
#   ncu       Nsight Compute (the H100 machine has ncu) over one fwd+bwd of OPS (default
#             triangle_multiply) at NS (default 768): benchmarks/ncu_ops.py's summary of every
#             launch (duration, registers, occupancy, spills, stall reasons) and the SASS hot
#             spots of SASS_KERNEL (default _triangle_input_backward_kernel); KERNELS is ncu's
#             kernel-name regex (default: megafold's kernels), LAUNCHES its launch count;
#             OPS=evo_attention with NCU_SHAPE (default tri), NCU_VARIANT a module exported by
#             variant_ab.py, run in place of its op (e.g. the dK/dV of a branch)
#   cueq-ops  first of two calls for the cuEquivariance rows: cuequivariance-ops-cu13 (45 MB,
#             carry .whl2) into /tmp/cueq; the next call must find the machine still warm
#   cueq-peers second call (carry .whl: cuequivariance, -torch, -ops-torch, trifast and
#             platformdirs, which cuequivariance-ops imports): EvoAttention's triangle shape at N=256-1024
#             against Flex, cuEquivariance and trifast, and
#             triangle multiplication against torch.compile and cuEquivariance, one run each
# Everything under $OUT ends packed in $OUT/results.tgz (the device tool returns few files
# per call); PACK=0 leaves the files as they are (for all but the last stage of one call).
set -uo pipefail
stage=${1:?stage}
OUT=${OUT:?set OUT}
export PYTHONPATH=${PYTHONPATH:-.}:.
export PYTHONUNBUFFERED=1 MEGAFOLD_CACHE_DIR=${MEGAFOLD_CACHE_DIR:-$OUT} MEGAFOLD_AUTOTUNE=${MEGAFOLD_AUTOTUNE:-0}
py=${PYTHON:-python3}
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    local started=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT/$stage-$name.log" | tail -n 60
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started))s"
}
# Carried wheels into a folder, no index ("${install_wheels[@]}" --target DIR WHEEL...; an
# array, not a function, so that `step` can run it under `timeout`).
install_wheels=($py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case $stage in
tests)
    # the GPU test files by name: other test modules import biotite, which the GPU image lacks;
    # the dashboard's two-minute test is the `dashboard` stage's run
    step pytest 560 $py -m pytest -m gpu -q -p no:cacheprovider --timeout 240 tests/kernels
    ;;
tests-model)
    # The loader's tests need zarr, the trainer's prediction step gemmi (sessions 5, 15, 16 and 25
    # failed there for want of it): carry their wheels in .whl (zarr, numcodecs, donfig,
    # google-crc32c, msgspec, gemmi; about 5 MB)
    if compgen -G ".whl/gemmi-*.whl" >/dev/null; then
        "${install_wheels[@]}" --target /tmp/site .whl/zarr-*.whl .whl/numcodecs-*.whl .whl/donfig-*.whl \
            .whl/google_crc32c-*.whl .whl/msgspec-*.whl .whl/gemmi-*.whl
    else
        echo "no .whl/gemmi-*.whl: the trainer test's prediction step will fail importing gemmi" >&2
    fi
    [ -d /tmp/site/biotite ] || echo "no biotite in /tmp/site (the biotite stage): the trainer test's prediction step will fail" >&2
    export PYTHONPATH=$PYTHONPATH:/tmp/site
    step pytest 560 $py -m pytest -m gpu -q -p no:cacheprovider --timeout 240 -k "not dashboard_target" \
        tests/model/test_gpu.py tests/profile/test_profiler_gpu.py tests/model/test_rollout_graph.py \
        tests/precache/test_loader.py tests/train/test_gpu.py tests/train/test_graphs.py
    ;;
kernels)
    step kernels 420 $py benchmarks/kernels.py --quick --ops "${OPS:-evo_attention,pair}" --out "$OUT"
    ;;
whole)
    step trunk 350 $py benchmarks/trunk.py --ns 384,768 --stacks eager,triton,triton-graph,cueq,cueq-graph,compile --out "$OUT"
    step train_step 240 $py benchmarks/train_step.py --source synthetic --kernels torch,triton,compile --out "$OUT"
    ;;
dashboard)
    step dashboard 200 $py benchmarks/dashboard_screenshot.py --out "$OUT"
    (cd "$OUT" && tar czf dashboard.tgz --remove-files */*-dashboard.zarr 2>/dev/null)
    ;;
step)
    step train_step 240 $py benchmarks/train_step.py --source synthetic --kernels torch,triton --out "$OUT"
    ;;
compile)
    export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
    step train_step_compile 560 $py benchmarks/train_step.py --source synthetic --kernels torch,triton,compile \
        --steps 2 --tag compile --out "$OUT"
    ;;
trace)
    step trace 240 $py benchmarks/step_trace.py --kernels torch,triton --out "$OUT"
    ;;
host)
    step host 240 $py benchmarks/host_profile.py --kernels triton,torch --out "$OUT"
    ;;
longest)
    step longest 260 $py benchmarks/trunk.py --ns 1536 --stacks triton --longest --longest-stacks triton \
        --longest-from 1792 --longest-step 256 --out "$OUT"
    step longest_offload 300 $py benchmarks/trunk.py --ns 2048 --stacks triton-offload --reps 1 --longest \
        --longest-stacks triton-offload --longest-from 2304 --longest-step 256 --out "$OUT"
    ;;
multigpu)
    export NCCL_NVLS_ENABLE=0
    step ddp_test 150 $py -m pytest -m gpu -q -p no:cacheprovider tests/train/test_distributed.py
    step multigpu 330 $py benchmarks/multigpu.py --gpus 2 --presets paper small --kernels triton --steps 6 --out "$OUT"
    ;;
dap)
    # (a 2-GPU machine) the sharded trunk's NCCL test, then the longest crop on 1 and 2 GPUs
    export NCCL_NVLS_ENABLE=0
    step dap_test 120 $py -m pytest -m gpu -q -p no:cacheprovider tests/train/test_dap.py
    step dap 560 $py benchmarks/dap.py --gpus 2 --ns 768 --time-budget 450 --out "$OUT"
    ;;
dap-longest)
    # (a 2-GPU machine) the DDP test, then the longest trunk crop on 1 GPU (from 1920) and on 2;
    # every rank capped at an H100's 79.2 GiB, so that H200s answer for the 80 GB card
    export NCCL_NVLS_ENABLE=0
    step ddp_test 110 $py -m pytest -m gpu -q -p no:cacheprovider tests/train/test_distributed.py
    step dap 430 $py benchmarks/dap.py --gpus 2 --ns "" --start 1920 --memory-gib 79.18 --time-budget 400 --out "$OUT"
    ;;
datawait)
    step store 120 $py benchmarks/train_step.py --preset small --kernels triton --steps 30 --source store --out "$OUT"
    step onthefly 240 $py benchmarks/train_step.py --preset small --kernels triton --steps 30 --source onthefly \
        --workers 12 --out "$OUT"
    ;;
curve)
    step curve 590 $py benchmarks/learning_curve.py --minutes 10 --eval-every 2.5 --wall-budget 6.5 --out outputs/curve
    ;;
curve-resume)
    step curve 420 $py benchmarks/learning_curve.py --minutes 10 --eval-every 2.5 --resume --out outputs/curve
    cp benchmarks/results/*/*learning_curve.json "$OUT"/ 2>/dev/null
    ;;
ncu)
    report="$OUT/ncu-${NCU_TAG:-ops}"
    step ncu_profile 400 ncu --kernel-name "regex:${KERNELS:-^_}" --launch-count "${LAUNCHES:-8}" --set full \
        --import-source no -f -o "$report" $py benchmarks/ncu_ops.py run --ops "${OPS:-triangle_multiply}" --ns "${NS:-768}" \
        ${NCU_SHAPE:+--shape "$NCU_SHAPE"} ${NCU_VARIANT:+--variant "$NCU_VARIANT"}
    step ncu_summary 120 $py benchmarks/ncu_ops.py summarise "$report.ncu-rep" \
        --sass "${SASS_KERNEL:-_triangle_input_backward_kernel}" --out "$OUT"
    ;;
retune-evo)
    step retune_evo 560 env MEGAFOLD_AUTOTUNE=force $py benchmarks/kernels.py --ops evo_attention --shapes tri \
        --ns 384,768 --graph --impls flex,megafold --out "$OUT"
    ;;
retune-triangle)
    step retune_triangle 560 env MEGAFOLD_AUTOTUNE=force $py benchmarks/kernels.py --ops triangle_multiply \
        --ns 384,768 --graph --impls megafold --out "$OUT"
    ;;
overhead)
    step profiler_overhead 400 $py benchmarks/profiler_overhead.py --rounds 2 --steps 4 --out "$OUT"
    ;;
launch)
    step host_overhead 200 $py benchmarks/host_overhead.py --out "$OUT"
    for run in 0a 1 0b; do
        step "step_fast$run" 170 env MEGAFOLD_FAST_LAUNCH=${run:0:1} $py benchmarks/train_step.py --source synthetic \
            --kernels triton --steps 5 --tag "fast-launch-$run" --out "$OUT"
    done
    ;;
biotite)
    step biotite 200 "${install_wheels[@]}" --target /tmp/site .whl3/*.whl
    ;;
cueq-ops)
    step cueq_ops 200 "${install_wheels[@]}" --target /tmp/cueq .whl2/*.whl
    ;;
cueq-peers)
    [ -d /tmp/cueq/cuequivariance_ops ] || { echo "no /tmp/cueq: run the cueq-ops stage first, same machine" >&2; exit 3; }
    "${install_wheels[@]}" --target /tmp/cueq .whl/cuequivariance*.whl .whl/platformdirs*.whl .whl/trifast*.whl >/dev/null
    export PYTHONPATH=$PYTHONPATH:/tmp/cueq
    mkdir -p "$OUT/evo" "$OUT/triangle"
    step evo_peers 330 $py benchmarks/kernels.py --ops evo_attention --shapes tri --ns 256,384,512,768,1024 \
        --graph --impls flex,megafold,cueq,trifast --out "$OUT/evo"
    step triangle_peers 220 $py benchmarks/kernels.py --ops triangle_multiply --ns 384,768 --graph \
        --impls compile,cueq,megafold --out "$OUT/triangle"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
if [ "${PACK:-1}" != 0 ]; then  # one archive: the device tool returns only a few files per call
    tar czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/"
fi
