#!/usr/bin/env bash
# The CUDA backend's device check, for a machine with an NVIDIA GPU and no
# network. Two steps:
#
#   scripts/gpu-check.sh --prepare DIR   # on an ordinary x86-64 build machine:
#                                        # builds the release `bitnet`, the
#                                        # CUDA test binary and the CPU kernel
#                                        # tests, copies them and stories260K
#                                        # into DIR (under 64 MiB)
#   scripts/gpu-check.sh DIR             # on the GPU machine, in one go
#
# The second step generates its models with `bitnet synth`, runs the GPU
# tests (the CUDA backend against the CPU backend on synthetic ternary
# models and stories260K, naming the first kernel that disagrees with the
# interpreter when they differ), then benchmarks the 2B4T-shaped model and
# prints a summary. Last, as the least urgent, the CPU kernel tests and
# benchmarks run on the GPU machine's own CPU, which likely has AVX-512
# VNNI (the development machine lacks it). NVRTC must be there (the CUDA
# toolkit or a pip wheel;
# see codegen/src/cuda/nvrtc.rs for where it looks). Each step has a time
# limit so that the whole run stays within about 5 minutes.
set -uo pipefail

if [ "${1:-}" = "--prepare" ]; then
  dir=${2:?usage: scripts/gpu-check.sh --prepare DIR}
  set -e
  cd "$(dirname "$0")/.."
  cargo build --release
  # The executable cargo built for test target $2 of package $1.
  test_bin() {
    cargo test -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null |
      python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"): print(m["executable"])' "$2" | tail -1
  }
  mkdir -p "$dir/data/models/stories260K"
  cp target/release/bitnet "$dir/bitnet"
  cp "$(test_bin bitnet cuda)" "$dir/cuda-tests"
  cp "$(test_bin bitnet-codegen kernels)" "$dir/cpu-kernel-tests"
  cp testdata/models/stories260K/stories260K.gguf "$dir/data/models/stories260K/"
  strip "$dir/bitnet" "$dir/cuda-tests" "$dir/cpu-kernel-tests" 2>/dev/null || true
  du -sh "$dir"
  exit 0
fi

dir=$(cd "${1:?usage: scripts/gpu-check.sh DIR (made by --prepare)}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bitnet="$dir/bitnet"
summary=()
note() { summary+=("$1"); echo "== $1"; }
# The first 8 greedy token ids of a model after $PROMPT_IDS (default 1,2,3,4), or the error.
greedy() {
  local m=$1; shift
  local out
  if out=$(timeout 120 "$bitnet" run -m "$m" --prompt-ids "${PROMPT_IDS:-1,2,3,4}" -n 8 --temp 0 --ignore-eos --json "$@" 2>"$work/run.err"); then
    python3 -c 'import json,sys; print(json.load(sys.stdin)["generated_ids"])' <<<"$out" 2>/dev/null || echo "(unreadable output)"
  else
    echo "(failed: $(tail -1 "$work/run.err"))"
  fi
}

echo "== GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi failed"

echo "== tests: the CUDA backend against the CPU backend and the interpreter"
if BITNET_BIN="$bitnet" BITNET_DATA="$dir/data" timeout 150 "$dir/cuda-tests" --test-threads 1 --nocapture 2>&1 | tee "$work/tests.log"; then
  note "tests: $(grep -E '^test result' "$work/tests.log" | tail -1)"
else
  note "tests: FAILED ($(grep -E '^test .* FAILED|^test result' "$work/tests.log" | tr '\n' ' '))"
fi

# A tuning database of this run's own.
export BITNET_CACHE_DIR="$work/cache"
for t in i2_s tq2_0; do
  m="$work/2b4t-$t.gguf"
  echo "== synth 2B4T shape, $t"
  if ! timeout 60 "$bitnet" synth --shape 2b4t --type "$t" -o "$m" >/dev/null 2>&1; then
    note "synth $t: failed"
    continue
  fi
  echo "== bench 2B4T $t on the GPU, default tiles"
  if out=$(timeout 60 "$bitnet" bench -m "$m" --device cuda -p 128 -n 64 -r 3 --no-tune --json 2>"$work/bench.err"); then
    note "bench 2b4t $t cuda default tiles: $out"
  else
    note "bench 2b4t $t cuda: FAILED: $(tail -3 "$work/bench.err")"
  fi
  if [ "$t" = i2_s ]; then
    # The shapes are the same for every weight type: one sweep serves both.
    echo "== autotune the 2B4T shapes on the GPU"
    if timeout 90 "$bitnet" autotune -m "$m" --device cuda >"$work/tune.out" 2>"$work/tune.err"; then
      cat "$work/tune.out"
      note "autotune --device cuda: $(grep -c 'isa=cuda' "$work/tune.out") jobs tuned"
    else
      note "autotune --device cuda: FAILED: $(tail -3 "$work/tune.err")"
    fi
  fi
  echo "== bench 2B4T $t on the GPU, tuned tiles"
  out=$(timeout 60 "$bitnet" bench -m "$m" --device cuda -p 128 -n 64 -r 3 --json 2>&1 | tail -1)
  note "bench 2b4t $t cuda tuned: $out"
  # bitnet.cpp's published GPU figure is for a 64-token prompt and 64 tokens out.
  out=$(timeout 30 "$bitnet" bench -m "$m" --device cuda -p 64 -n 64 -r 3 --json 2>&1 | tail -1)
  note "bench 2b4t $t cuda tuned p64 n64: $out"
  # A long context: one token's attention split over blocks (flash-decoding).
  out=$(timeout 60 "$bitnet" bench -m "$m" --device cuda -p 2048 -n 64 -r 1 -c 4096 --json 2>&1 | tail -1)
  note "bench 2b4t $t cuda tuned p2048 n64: $out"
  # The int8 head (half the head's bytes).
  out=$(timeout 60 "$bitnet" bench -m "$m" --device cuda --head q8 -p 128 -n 64 -r 3 --json 2>&1 | tail -1)
  note "bench 2b4t $t cuda --head q8: $out"
  # Many sequences a step (issue: aggregate decode with 32 sequences >= 10x single).
  for n in 8 32; do
    out=$(timeout 90 "$bitnet" bench -m "$m" --device cuda -p 32 -n 64 -r 1 --parallel "$n" --json 2>&1 | tail -1)
    note "bench 2b4t $t cuda --parallel $n: $out"
  done
  echo "== greedy tokens, GPU (in memory and from a CUDA artifact) against CPU, 2B4T $t"
  timeout 60 "$bitnet" compile -m "$m" --device cuda -o "$work/2b4t-$t.bnx" 2>"$work/compile.err" || note "compile 2b4t $t --device cuda: FAILED: $(tail -3 "$work/compile.err")"
  if [ "$t" = i2_s ]; then
    # The artifact: PTX for sm_80, JIT-compiled by the driver at load.
    out=$(timeout 60 "$bitnet" bench -m "$work/2b4t-$t.bnx" --device cuda -p 128 -n 64 -r 3 --json 2>&1 | tail -1)
    note "bench 2b4t $t cuda artifact (sm_80 PTX): $out"
  fi
  gpu=$(greedy "$m" --device cuda)
  bnx=$(greedy "$work/2b4t-$t.bnx" --device cuda)
  cpu=$(greedy "$m" -t "$(nproc)")
  [ "$gpu" = "$cpu" ] && [ "$bnx" = "$cpu" ] && note "greedy 2b4t $t: same tokens $gpu" || note "greedy 2b4t $t: DIFFER gpu=$gpu artifact=$bnx cpu=$cpu"
  if [ "$t" = i2_s ]; then
    # 600 positions: the prompt's attention merges up to three chunks a
    # block, and the decode steps' adds up three blocks a head.
    gpu=$(PROMPT_IDS=$(seq -s, 5 604) greedy "$m" --device cuda)
    cpu=$(PROMPT_IDS=$(seq -s, 5 604) greedy "$m" -t "$(nproc)")
    [ "$gpu" = "$cpu" ] && note "greedy 2b4t $t after 600 tokens: same tokens $gpu" || note "greedy 2b4t $t after 600 tokens: DIFFER gpu=$gpu cpu=$cpu"
  fi
  rm -f "$work/2b4t-$t.bnx"
done

# Last, as the least urgent: this machine's CPU likely has AVX-512 VNNI,
# which the development machine lacks.
echo "== CPU kernel tests on this machine's CPU (AVX-512 VNNI, if it has it)"
if timeout 90 "$dir/cpu-kernel-tests" --nocapture 2>&1 | tee "$work/cpu.log"; then
  note "cpu kernels: $(grep -E '^test result' "$work/cpu.log" | tail -1) $(grep -o 'skipped: .*' "$work/cpu.log" | head -1)"
else
  note "cpu kernels: FAILED ($(grep -E '^test .* FAILED' "$work/cpu.log" | tr '\n' ' '))"
fi
m="$work/2b4t-tq2_0.gguf"
if [ -f "$m" ]; then
  for isa in avx2 avx512vnni; do
    out=$(timeout 45 "$bitnet" bench -m "$m" -p 128 -n 16 -r 1 -t "$(nproc)" --isa "$isa" --no-tune --json 2>&1 | tail -1)
    note "bench 2b4t tq2_0 cpu $isa: $out"
  done
fi

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
