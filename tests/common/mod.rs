#![allow(dead_code)]
//! Helpers shared by the integration tests.

use bitnet_frontends::arch::Activation;
use bitnet_frontends::synth::{self, SynthShape, SynthSpec};
use bitnet_ir::DType;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A file under `testdata/`; tests that need it fail when it is missing.
/// `BITNET_DATA` replaces that folder where the tests run away from the
/// repository (scripts/gpu-check.sh).
pub fn data(rel: &str) -> PathBuf {
    let root = std::env::var_os("BITNET_DATA").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata"), PathBuf::from);
    let p = root.join(rel);
    assert!(p.exists(), "test data {} is missing (testdata/ is part of the repository)", p.display());
    p
}

/// Whether an optional tool is here. Without it a test skips with a
/// message, or fails where `BITNET_REQUIRE_TOOLS` is set (CI installs them all).
pub fn have(found: bool, what: &str, install: &str) -> bool {
    if !found {
        assert!(std::env::var_os("BITNET_REQUIRE_TOOLS").is_none(), "{what} is not installed ({install})");
        eprintln!("skipped: {what} is not installed ({install})");
    }
    found
}

/// [`have`] for a command on the `PATH`.
pub fn have_command(name: &str, install: &str) -> bool {
    let found = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().is_ok_and(|o| o.status.success());
    have(found, name, install)
}

/// [`have`] for Python modules `python3` can import.
pub fn have_python_modules(modules: &[&str], install: &str) -> bool {
    let found = Command::new("python3").args(["-c", &format!("import {}", modules.join(", "))]).output().is_ok_and(|o| o.status.success());
    have(found, &format!("the Python modules {}", modules.join(", ")), install)
}

pub fn stories() -> PathBuf {
    data("models/stories260K/stories260K.gguf")
}

pub fn tmp_dir(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("bitnet-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

/// A test's scratch folder, removed when the test ends; a failing test's
/// stays for a look, and `BITNET_KEEP_TMP=1` keeps them all. (Left behind,
/// a full run's came to about a gigabyte of /tmp.)
pub struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TmpDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if !std::thread::panicking() && std::env::var_os("BITNET_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A small model with uneven dims (hidden 256, 3 layers, GQA 4/2, FFN 512).
pub fn small_spec(weight_type: DType, activation: Activation) -> SynthSpec {
    SynthSpec {
        shape: SynthShape { hidden: 256, layers: 3, heads: 4, kv_heads: 2, ffn: 512, vocab: 300 },
        weight_type,
        head_type: DType::F16,
        activation,
        seed: 11,
        context: 256,
        rope_theta: 10000.0,
    }
}

pub fn write_synth(spec: &SynthSpec, path: &Path) {
    synth::write(spec, None, path, |_, _| {}).unwrap();
}

/// The `bitnet` binary: the one cargo built, or `BITNET_BIN`.
pub fn bitnet_bin() -> PathBuf {
    std::env::var_os("BITNET_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bitnet")), PathBuf::from)
}

pub fn bitnet(args: &[&str]) -> Output {
    Command::new(bitnet_bin()).args(args).output().expect("running bitnet")
}

/// `bitnet` with its tuning database in `cache` (not the user's).
pub fn bitnet_cached(cache: &Path, args: &[&str]) -> Output {
    Command::new(bitnet_bin()).env("BITNET_CACHE_DIR", cache).args(args).output().expect("running bitnet")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Writes the small model in every ternary format with both FFN
/// activations into `dir`, calling `check` on each.
pub fn each_small_ternary_model(dir: &Path, mut check: impl FnMut(&Path)) {
    for dtype in [DType::I2S, DType::TQ2_0, DType::TQ1_0] {
        for act in [Activation::Relu2, Activation::Silu] {
            let path = dir.join(format!("{dtype}-{act:?}.gguf"));
            write_synth(&small_spec(dtype, act), &path);
            check(&path);
        }
    }
}

/// The first `n` greedy tokens after `prompt`, from an empty cache.
pub fn greedy(s: &mut bitnet_runtime::Session, prompt: &[u32], n: usize) -> Vec<u32> {
    use bitnet_runtime::{GenerateOptions, SamplerConfig};
    s.reset();
    let opts = GenerateOptions { n_predict: n, ignore_eos: true, sampler: SamplerConfig { temperature: 0.0, ..Default::default() }, dump_logits: false };
    s.generate(prompt, &opts, |_| {}).unwrap().generated_ids
}

/// Largest |a − b| relative to the largest |b|.
/// Results of different lengths (or none) are an infinite difference.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() || a.is_empty() {
        return f32::INFINITY;
    }
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}
