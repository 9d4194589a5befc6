#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (libFuzzer, nightly Rust), each
# from its seeds and its dictionary, under AddressSanitizer by default.
#
#   scripts/fuzz.sh [--time SECONDS] [--runs N] [--no-asan] [--ci] [--jobs N] [--summary FILE] [TARGET...]
#
# --time     seconds per target (default 30); --runs: stop a target after
#            N executions instead (whichever comes first)
# --no-asan  build without AddressSanitizer
# --ci       no AddressSanitizer and fuzz/Cargo.toml's quicker dev profile
#            (opt-level 1): what .ci/run uses for its short runs
# --jobs     parallel fuzzing processes per target (default 1)
# --summary  where the summary table goes (default fuzz/last-run.tsv; give
#            each of several fuzz.sh runs at once its own)
# TARGET     gguf model hf artifact tokenizer chat_template tuning_db
#            openai_request (default: all)
#
# The corpus grows in fuzz/corpus/TARGET (ignored by git); a crash, hang or
# out-of-memory input lands in fuzz/artifacts/TARGET and fails the run (an
# input slower than 10 s is kept there too, counted as "slow"): fix
# it, then copy the input to fuzz/regressions/TARGET/ so the normal tests
# replay it. A summary (executions, coverage, features, corpus, crashes per
# target) is printed at the end and written to fuzz/last-run.tsv (or FILE).
set -euo pipefail
cd "$(dirname "$0")/.."

time_s=30 runs=0 sanitizer=address jobs=1 targets=() profile=(-O --debug-assertions) outdir=release summary=fuzz/last-run.tsv
while [ $# -gt 0 ]; do
    case "$1" in
        --time) time_s="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        --no-asan) sanitizer=none; shift ;;
        --ci) sanitizer=none profile=(--dev) outdir=debug; shift ;;
        --jobs) jobs="$2"; shift 2 ;;
        --summary) summary="$2"; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
all=(gguf model hf artifact tokenizer chat_template tuning_db openai_request gbnf)
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
    [ -f "fuzz/fuzz_targets/$t.rs" ] || { echo "fuzz.sh: no target $t (targets: ${all[*]})" >&2; exit 2; }
done

# cargo-fuzz passes rustc unstable flags: nightly's, else the one toolchain
# with RUSTC_BOOTSTRAP=1 (machines that cannot fetch another toolchain).
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    tc=(+nightly)
else
    tc=()
    export RUSTC_BOOTSTRAP=1
    echo "fuzz.sh: no nightly toolchain; using $(rustc --version) with RUSTC_BOOTSTRAP=1"
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

echo "fuzz.sh: building ${#targets[@]} target(s), sanitizer $sanitizer"
one=() && [ ${#targets[@]} -eq 1 ] && one=("${targets[0]}")
cargo "${tc[@]}" fuzz build "${profile[@]}" -s "$sanitizer" "${one[@]}"

# The binaries just built: runs below use them as they are, even if the
# sources change meanwhile.
bin=fuzz/target/$(rustc "${tc[@]}" -vV | sed -n 's/^host: //p')/$outdir

# What libFuzzer left in a target's folder: failures, and inputs over 10 s.
found() { find "fuzz/artifacts/$1" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l; }
slow() { find "fuzz/artifacts/$1" -type f -name 'slow-unit-*' | wc -l; }
dict_of() { case "$1" in model) echo gguf ;; *) echo "$1" ;; esac; }
printf 'target\texecutions\tseconds\tcoverage\tfeatures\tcorpus\tcrashes\tslow\n' > "$summary"
failed=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    cp -n fuzz/seeds/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
    # Real files from testdata/ too (too big to keep twice in the repository).
    case "$t" in
        gguf) for f in models/stories260K/stories260K.gguf tokenizers/llama-cpp-vocab/ggml-vocab-{llama-spm,gpt-2}.gguf; do
                  cp -n "testdata/$f" "fuzz/corpus/$t/testdata-$(basename "$f")"; done ;;
        model) cp -n testdata/models/stories260K/stories260K.gguf "fuzz/corpus/$t/testdata-stories260K.gguf" ;;
        hf) hf=testdata/models/stories260K/hf
            [ -e "fuzz/corpus/$t/testdata-stories260K" ] ||
                { cat "$hf/config.json"; printf '\n\0--8<--\0\n'; cat "$hf/model.safetensors"; } > "fuzz/corpus/$t/testdata-stories260K" ;;
    esac
    log="fuzz/artifacts/$t/last.log"
    before=$(found "$t") slow_before=$(slow "$t")
    args=(-dict="fuzz/dict/$(dict_of "$t").dict" -max_total_time="$time_s" -rss_limit_mb=2048 -timeout=30
          -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/")
    [ "$runs" -gt 0 ] && args+=(-runs="$runs")
    [ "$jobs" -gt 1 ] && args+=(-jobs="$jobs" -workers="$jobs")
    start=$(date +%s)
    set +e
    "$bin/$t" "${args[@]}" "fuzz/corpus/$t" > "$log" 2>&1
    rc=$?
    set -e
    secs=$(( $(date +%s) - start ))
    execs=$( (grep -h 'stat::number_of_executed_units' "$log" fuzz/artifacts/"$t"/fuzz-*.log 2>/dev/null || true) | awk '{s+=$2} END {print s+0}')
    last=$( (grep -hE '^#[0-9]+' "$log" || true) | tail -1)
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    crashes=$(( $(found "$t") - before )) slow_units=$(( $(slow "$t") - slow_before ))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$execs" "$secs" "${cov:-?}" "${ft:-?}" "$corpus" "$crashes" "$slow_units" >> "$summary"
    if [ "$rc" -ne 0 ] || [ "$crashes" -gt 0 ]; then
        failed+=("$t")
        echo "fuzz.sh: $t FAILED (exit $rc); the input is in fuzz/artifacts/$t, the log in $log:" >&2
        grep -E 'panicked|ERROR: |SUMMARY' "$log" | head -5 >&2 || true
    fi
done
column -t -s $'\t' "$summary"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
