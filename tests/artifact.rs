//! `.bnx` artifacts: compile → write → map → run gives exactly what
//! compiling in memory gives (a serialize-then-reload test over every
//! ternary format, both heads, GGUF and Hugging Face sources), and a
//! damaged, foreign or misused artifact is a clear error, never a panic.

mod common;

use bitnet_codegen::cpu::ternary::Packing;
use bitnet_codegen::schedule::{HeadQuant, Pinned};
use bitnet_frontends::arch::Activation;
use bitnet_frontends::synth::{SynthShape, SynthSpec};
use bitnet_ir::DType;
use bitnet_runtime::artifact::FORMAT_VERSION;
use bitnet_runtime::{LoadOptions, Session};
use common::*;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn opts(head: HeadQuant, threads: usize) -> LoadOptions {
    LoadOptions { threads, pinned: Pinned { head, ..Default::default() }, ..Default::default() }
}

/// Compiles `src` in memory and writes it to `out`.
fn compile(src: &Path, out: &Path, head: HeadQuant) -> Session {
    let s = Session::load(src, &opts(head, 1)).unwrap();
    s.write_artifact(out, src).unwrap();
    s
}

fn round_trip(src: &Path, out: &Path, head: HeadQuant, prompt: &[u32]) {
    let mut mem = compile(src, out, head);
    let mut bnx = Session::load(out, &opts(HeadQuant::Stored, 2)).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    assert!(bnx.warnings.is_empty(), "{:?}", bnx.warnings);
    assert_eq!(bnx.artifact.as_ref().unwrap().head, head.name());
    assert_eq!(bnx.graph_text(), mem.graph_text());
    assert_eq!(bnx.schedule().unwrap().to_string(), mem.schedule().unwrap().to_string());
    let (a, b) = (mem.eval(prompt, true).unwrap(), bnx.eval(prompt, true).unwrap());
    assert_eq!(a, b, "{}: the artifact's logits differ from compiling in memory", src.display());
    assert_eq!(mem.eval(&[5], false).unwrap(), bnx.eval(&[5], false).unwrap(), "{}: decode step", src.display());
    assert_eq!(greedy(&mut mem, prompt, 10), greedy(&mut bnx, prompt, 10));
    assert_eq!(mem.tokenizer.encode("Once upon a time", true, false).unwrap(), bnx.tokenizer.encode("Once upon a time", true, false).unwrap());
    assert_eq!(mem.model.config.vocab, bnx.model.config.vocab);
}

#[test]
fn artifacts_run_exactly_like_compiling_in_memory() {
    let dir = tmp_dir("artifact-round-trip");
    for dtype in [DType::I2S, DType::TQ2_0, DType::TQ1_0] {
        let src = dir.join(format!("{dtype}.gguf"));
        write_synth(&small_spec(dtype, Activation::Relu2), &src);
        for head in HeadQuant::ALL {
            round_trip(&src, &dir.join(format!("{dtype}-{}.bnx", head.name())), head, &[1, 17, 42, 99, 3, 250, 8]);
        }
    }
    round_trip(&stories(), &dir.join("stories.bnx"), HeadQuant::Stored, &[1, 403, 407, 261, 378]);
    round_trip(&data("models/stories260K/hf"), &dir.join("stories-hf.bnx"), HeadQuant::Stored, &[1, 403, 407, 261, 378]);
    std::fs::remove_dir_all(dir).ok();
}

/// An artifact keeps the packing it was compiled with: reloaded without
/// asking, it reads its 1.6-bit weights from the file and computes what
/// compiling in memory computes.
#[test]
fn artifacts_keep_the_1_6_bit_packing() {
    let dir = tmp_dir("artifact-packing");
    let (src, out) = (dir.join("tq2_0.gguf"), dir.join("tq2_0-base3.bnx"));
    // Rows of 1280 and 2560 weights: whole chunks of both packings.
    let shape = SynthShape { hidden: 1280, layers: 1, heads: 4, kv_heads: 2, ffn: 2560, vocab: 300 };
    write_synth(&SynthSpec { shape, ..small_spec(DType::TQ2_0, Activation::Silu) }, &src);
    let pinned = Pinned { packing: Some(Packing::Base3), ..Default::default() };
    let mut mem = Session::load(&src, &LoadOptions { threads: 1, pinned, ..Default::default() }).unwrap();
    mem.write_artifact(&out, &src).unwrap();
    let mut bnx = Session::load(&out, &opts(HeadQuant::Stored, 2)).unwrap();
    assert!(bnx.schedule().unwrap().to_string().contains("packing=1.6bit"));
    assert_eq!(bnx.with_backend(|b| b.as_compiled().map(|c| c.weight_layout())), Some("1.6bit"));
    let prompt = [1, 17, 42, 99, 3];
    assert_eq!(mem.eval(&prompt, true).unwrap(), bnx.eval(&prompt, true).unwrap());
    assert_eq!(greedy(&mut mem, &prompt, 8), greedy(&mut bnx, &prompt, 8));
    // 20% fewer bytes in the ternary matrices (3.7 MB of the 2-bit file's
    // 5.2; the rest, embedding and head, is the same).
    let two = dir.join("tq2_0.bnx");
    compile(&src, &two, HeadQuant::Stored);
    let (a, b) = (std::fs::metadata(&two).unwrap().len(), std::fs::metadata(&out).unwrap().len());
    assert!(b * 100 < a * 90 && b * 100 > a * 80, "1.6-bit artifact {b} bytes, 2-bit {a}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn the_cli_compiles_runs_and_inspects_artifacts() {
    let dir = tmp_dir("artifact-cli");
    let out = dir.join("s.bnx");
    let (src, o) = (stories(), out.to_str().unwrap());
    let c = bitnet(&["compile", "-m", src.to_str().unwrap(), "-o", o]);
    assert!(c.status.success(), "{}", stderr(&c));
    let run = |m: &str| {
        let r = bitnet(&["run", "-m", m, "-p", "Once upon a time", "-n", "12", "--temp", "0", "--json"]);
        assert!(r.status.success(), "{}", stderr(&r));
        let j: serde_json::Value = serde_json::from_str(&stdout(&r)).unwrap();
        j["generated_ids"].clone()
    };
    assert_eq!(run(o), run(src.to_str().unwrap()));
    // Every kernel generated by Cranelift, compiled into the artifact's schedule and JIT-compiled when it loads.
    let cl = dir.join("cl.bnx");
    let c = bitnet(&["compile", "-m", src.to_str().unwrap(), "--isa", "cranelift", "-o", cl.to_str().unwrap()]);
    assert!(c.status.success(), "{}", stderr(&c));
    assert_eq!(run(cl.to_str().unwrap()), run(o));
    assert!(stdout(&bitnet(&["inspect", cl.to_str().unwrap()])).contains("isa=cranelift"));
    let i = bitnet(&["inspect", o]);
    assert!(i.status.success(), "{}", stderr(&i));
    for want in ["format", "heuristic", "fingerprint", "stories260K.gguf"] {
        assert!(stdout(&i).contains(want), "inspect lacks {want}: {}", stdout(&i));
    }
    let fail = |args: &[&str], want: &str| {
        let r = bitnet(args);
        assert!(!r.status.success() && stderr(&r).contains(want), "{args:?}: {}", stderr(&r));
    };
    fail(&["run", "-m", o, "-p", "hi", "--backend", "interp"], "compiled code only");
    fail(&["run", "-m", o, "-p", "hi", "--head", "q8"], "fixed when the artifact is compiled");
    fail(&["run", "-m", o, "-p", "hi", "--isa", "scalar"], "chosen when it was compiled");
    fail(&["compile", "-m", o, "-o", dir.join("t.bnx").to_str().unwrap()], "already a compiled artifact");
    fail(&["compile", "-m", src.to_str().unwrap()], "nothing to do");
    std::fs::remove_dir_all(dir).ok();
}

fn damaged(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn load_err(p: &Path) -> String {
    match Session::load(p, &opts(HeadQuant::Stored, 1)) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn damaged_and_foreign_artifacts_are_clear_errors() {
    let dir = tmp_dir("artifact-damage");
    let good = dir.join("good.bnx");
    compile(&stories(), &good, HeadQuant::Stored);
    let bytes = std::fs::read(&good).unwrap();
    // Another format version.
    let mut v = bytes.clone();
    v[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let e = load_err(&damaged(&dir, "version.bnx", &v));
    assert!(e.contains(&format!("format v{}", FORMAT_VERSION + 1)) && e.contains("bitnet compile"), "{e}");
    // Cut anywhere: inside the prefix, the header, the weights section.
    for cut in [9, 30, 500, 4096 + 10, bytes.len() / 2, bytes.len() - 1] {
        let e = load_err(&damaged(&dir, "cut.bnx", &bytes[..cut]));
        assert!(e.contains("cut.bnx"), "cut at {cut}: {e}");
    }
    // A header that is not JSON.
    let mut h = bytes.clone();
    h[24..40].fill(b'#');
    assert!(load_err(&damaged(&dir, "header.bnx", &h)).contains("corrupt header"));
    // Kernels this CPU cannot run: no CPU lacks scalar code, so fake a device.
    // Edited in place, byte for byte: the prefix holds binary lengths.
    let (from, to) = (b"\"device\":\"cpu\"", b"\"device\":\"tpu\"");
    let at = bytes.windows(from.len()).position(|w| w == from).expect("the header names its device");
    let mut d = bytes.clone();
    d[at..at + to.len()].copy_from_slice(to);
    let e = load_err(&damaged(&dir, "device.bnx", &d));
    assert!(e.contains("compiled for tpu"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Bytes flipped anywhere (often in the header and graph text): an
    /// error, or a model that runs; never a panic.
    #[test]
    fn flipped_bytes_never_panic(flips in prop::collection::vec((prop_oneof![0usize..48 << 10, 0usize..2 << 20], any::<u8>()), 1..6)) {
        // One compiled artifact for every case; each case's folder goes with it.
        static GOOD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let dir = tmp_dir("artifact-fuzz");
        let mut bytes = GOOD
            .get_or_init(|| {
                let good = dir.join("good.bnx");
                compile(&stories(), &good, HeadQuant::Stored);
                std::fs::read(&good).unwrap()
            })
            .clone();
        for (at, x) in flips {
            let i = at % bytes.len();
            bytes[i] ^= x | 1;
        }
        let p = dir.join(format!("f{}.bnx", std::process::id()));
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(mut s) = Session::load(&p, &opts(HeadQuant::Stored, 1)) {
            let _ = s.eval(&[1, 2, 3], true);
        }
    }
}
