//! Performance regression tracking that CI can trust: instruction counts
//! (valgrind's callgrind, repeatable run to run on a noisy shared machine)
//! of prefill and decode on a small synthetic model, pinned to one
//! configuration (`-t 1 --no-tune --isa avx2`, so that neither the thread
//! pool nor the ISA choice moves them), against the baseline committed in
//! `perf/instruction-counts.json` under that configuration's key (which
//! names the build profile and the compiler: another rustc compiles other
//! code). A figure more than [`TOLERANCE`] above its baseline fails the
//! test; one more than that below it asks for the baseline to be updated
//! (`BITNET_UPDATE_BASELINES=1 cargo test --test instruction_counts`), and
//! one below [`IMPLAUSIBLE`] of it fails: the count no longer measures the
//! steps (a renamed or inlined `Engine::step_timed` collects nothing).
//! With `BITNET_REQUIRE_TOOLS` (CI), a missing baseline fails too.
//! Wall-clock figures are `scripts/bench_compare.py`'s, for quiet machines.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Allowed rise, as a fraction (the same build counts within 0.001% here).
const TOLERANCE: f64 = 0.02;
/// A count below this fraction of its baseline measured something else.
const IMPLAUSIBLE: f64 = 0.5;
const PROMPT: usize = 64;
const DECODE: usize = 4;

/// Instructions executed inside the engine's steps for one `bitnet run`.
fn counted(model: &Path, n: usize, dir: &Path) -> u64 {
    let ids: Vec<String> = (0..PROMPT).map(|i| (1 + (i * 37) % 500).to_string()).collect();
    let out = dir.join(format!("callgrind.{n}.out"));
    let o = Command::new("valgrind")
        .args(["--tool=callgrind", "--toggle-collect=*Engine::step_timed*"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(env!("CARGO_BIN_EXE_bitnet"))
        .args(["run", "-m", model.to_str().unwrap(), "--prompt-ids", &ids.join(","), "-n", &n.to_string()])
        .args(["--temp", "0", "--ignore-eos", "-t", "1", "--no-tune", "--isa", "avx2"])
        .output()
        .expect("running valgrind");
    assert!(o.status.success(), "bitnet run under callgrind failed:\n{}", stderr(&o));
    let text = std::fs::read_to_string(&out).unwrap();
    let total = text.lines().find_map(|l| l.strip_prefix("totals: ")).expect("callgrind wrote totals");
    let total: u64 = total.trim().parse().unwrap();
    assert!(total > 0, "callgrind counted nothing inside Engine::step_timed: was it renamed or inlined?");
    total
}

/// The version of the rustc on the `PATH` (the one cargo built this with).
fn rustc_version() -> String {
    let o = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into())).arg("--version").output().expect("running rustc --version");
    stdout(&o).split_whitespace().nth(1).expect("rustc --version prints a version").to_string()
}

#[test]
fn prefill_and_decode_instruction_counts_hold_their_baseline() {
    if !have_command("valgrind", "apt-get install valgrind") {
        return;
    }
    let avx2 = cfg!(target_arch = "x86_64") && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    if !avx2 {
        eprintln!("skipped: the pinned configuration runs the AVX2 kernels, which this CPU lacks");
        return;
    }
    let dir = tmp_dir("instruction-counts");
    let model = dir.join("tiny.gguf");
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet")).args(["synth", "--shape", "tiny", "--type", "i2_s", "-o", model.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let prefill = counted(&model, 1, &dir);
    let decode = (counted(&model, 1 + DECODE, &dir) - prefill) / DECODE as u64;
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    let key = format!("synth tiny i2_s, prompt {PROMPT}, decode {DECODE}, -t 1 --no-tune --isa avx2, {profile} build, rustc {}", rustc_version());
    let now: BTreeMap<String, u64> = [("prefill_instructions".to_string(), prefill), ("decode_instructions_per_token".to_string(), decode)].into();
    println!("{key}: {now:?}");

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("perf/instruction-counts.json");
    let mut all: BTreeMap<String, BTreeMap<String, u64>> =
        std::fs::read_to_string(&path).map_or_else(|_| BTreeMap::new(), |t| serde_json::from_str(&t).unwrap());
    if std::env::var_os("BITNET_UPDATE_BASELINES").is_some() {
        all.insert(key, now);
        std::fs::write(&path, serde_json::to_string_pretty(&all).unwrap() + "\n").unwrap();
        return;
    }
    let Some(base) = all.get(&key) else {
        let msg = format!("no baseline for {key} in {} (record one with BITNET_UPDATE_BASELINES=1)", path.display());
        assert!(std::env::var_os("BITNET_REQUIRE_TOOLS").is_none(), "{msg}");
        eprintln!("skipped: {msg}");
        return;
    };
    let mut regressed = Vec::new();
    for (name, &value) in &now {
        let was = base[name];
        let change = value as f64 / was as f64 - 1.0;
        println!("{name}: {was} -> {value} ({:+.3}%)", 100.0 * change);
        assert!(
            value as f64 >= IMPLAUSIBLE * was as f64,
            "{name} fell from {was} to {value}: too far to be a speed-up; the count no longer measures the engine's steps"
        );
        if change > TOLERANCE {
            regressed.push(format!("{name} rose {:+.2}% ({was} -> {value})", 100.0 * change));
        } else if change < -TOLERANCE {
            eprintln!("{name} fell {:.2}%: faster; update the baseline (BITNET_UPDATE_BASELINES=1 cargo test --test instruction_counts)", -100.0 * change);
        }
    }
    assert!(regressed.is_empty(), "instruction counts regressed beyond {}% ({key}): {}", 100.0 * TOLERANCE, regressed.join("; "));
}
