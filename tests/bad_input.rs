//! Bad input: each a clear error and a non-zero exit, never a panic.

mod common;
use bitnet_frontends::arch::Activation;
use bitnet_frontends::gguf::{GgufFile, GgufWriter, MetaValue};
use bitnet_frontends::model::Model;
use bitnet_ir::interp::{Interpreter, KvCache, Tensor};
use bitnet_ir::DType;
use common::*;
use std::path::{Path, PathBuf};

fn tiny_model(dir: &Path) -> PathBuf {
    let p = dir.join("good.gguf");
    if !p.exists() {
        write_synth(&small_spec(DType::TQ2_0, Activation::Relu2), &p);
    }
    p
}

/// Rewrites a GGUF through `edit`, which may change metadata and tensor
/// infos; tensor bytes are copied (or zero-filled if their size changed).
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut GgufWriter)) {
    let f = GgufFile::open(src).unwrap();
    let mut w = GgufWriter::new();
    w.metadata = f.metadata.clone();
    for t in &f.tensors {
        w.add_tensor(&t.name, t.dtype, &t.shape);
    }
    edit(&mut w);
    let tensors = w.tensors.clone();
    w.write_file(dst, |i| {
        let (name, dtype, shape) = &tensors[i];
        let size = dtype.bytes_for(shape.iter().product()).unwrap();
        Ok(match f.tensor(name) {
            Some(t) if t.size == size => f.data(t).to_vec(),
            _ => vec![0u8; size],
        })
    })
    .unwrap();
}

fn expect_failure(args: &[&str], needle: &str) {
    let o = bitnet(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(err.contains(needle), "{args:?}: expected {needle:?} in: {err}");
}

fn run_args(model: &Path) -> Vec<String> {
    ["run", "-m", model.to_str().unwrap(), "-p", "hello", "-n", "2", "--greedy"].iter().map(|s| s.to_string()).collect()
}

fn run_fails(model: &Path, needle: &str) {
    let args = run_args(model);
    expect_failure(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle);
}

#[test]
fn broken_files_are_refused_clearly() {
    let dir = tmp_dir("bad");
    let good = tiny_model(&dir);
    let bytes = std::fs::read(&good).unwrap();
    let write = |name: &str, b: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    run_fails(&write("truncated.gguf", &bytes[..bytes.len() / 2]), "truncated");
    run_fails(&write("header-cut.gguf", &bytes[..300]), "truncated");
    run_fails(&write("empty.gguf", b""), "magic");
    let mut b = bytes.clone();
    b[0] = b'X';
    run_fails(&write("magic.gguf", &b), "bad magic");
    let mut b = bytes.clone();
    b[4..8].copy_from_slice(&7u32.to_le_bytes());
    run_fails(&write("version.gguf", &b), "unknown GGUF version 7");
    let mut b = bytes.clone();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    run_fails(&write("count.gguf", &b), "metadata count");
    run_fails(&dir.join("does-not-exist.gguf"), "No such file");
}

#[test]
fn model_level_problems_are_refused_clearly() {
    let dir = tmp_dir("bad-model");
    let good = tiny_model(&dir);
    let p = dir.join("missing.gguf");
    rewrite(&good, &p, |w| w.tensors.retain(|t| t.0 != "blk.1.ffn_up.weight"));
    run_fails(&p, "tensor blk.1.ffn_up.weight is missing");
    let p = dir.join("shape.gguf");
    rewrite(&good, &p, |w| w.tensors.iter_mut().filter(|t| t.0 == "blk.0.attn_k.weight").for_each(|t| t.2 = vec![256, 256]));
    run_fails(&p, "blk.0.attn_k.weight has shape [256, 256], expected [128, 256]");
    let p = dir.join("arch.gguf");
    rewrite(&good, &p, |w| w.set("general.architecture", MetaValue::String("mamba".into())));
    run_fails(&p, "architecture \"mamba\" is not supported");
    let p = dir.join("hparams.gguf");
    rewrite(&good, &p, |w| w.set("bitnet-b1.58.attention.head_count", MetaValue::U32(0)));
    run_fails(&p, "out of range");
    let p = dir.join("vocab.gguf");
    rewrite(&good, &p, |w| w.set("bitnet-b1.58.vocab_size", MetaValue::U32(100_000)));
    run_fails(&p, "token_embd.weight has shape");
    // An unknown tensor type id, written by hand into the info block.
    let mut b = std::fs::read(&good).unwrap();
    let name = b"blk.0.ffn_gate.weight";
    let at = b.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16;
    b[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    let p = dir.join("type.gguf");
    std::fs::write(&p, &b).unwrap();
    run_fails(&p, "unknown tensor type 77");
}

#[test]
fn vocabulary_only_files_can_be_inspected_and_tokenized_but_not_run() {
    let vocab = data("tokenizers/llama-cpp-vocab/ggml-vocab-llama-bpe.gguf");
    let v = vocab.to_str().unwrap();
    let o = bitnet(&["tokenize", "-m", v, "--json", "Hello world"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o).trim(), r#"{"ids":[128000,9906,1917]}"#);
    let o = bitnet(&["tokenize", "-m", v, "--no-bos", "Hello world"]);
    assert_eq!(stdout(&o).trim(), "9906 1917");
    let o = bitnet(&["inspect", v]);
    assert!(o.status.success() && stdout(&o).contains("vocabulary-only"), "{}", stdout(&o));
    run_fails(&vocab, "vocabulary-only");
}

#[test]
fn prompts_longer_than_the_context_are_refused() {
    let s = stories();
    let s = s.to_str().unwrap();
    expect_failure(&["run", "-m", s, "-p", "Once upon a time there was a big dog", "-c", "4", "-n", "2"], "longer than");
    expect_failure(&["run", "-m", s, "--prompt-ids", "1,99999", "-n", "2"], "outside the model's vocabulary");
    expect_failure(&["run", "-m", s, "--prompt-ids", "", "-n", "2"], "");
    expect_failure(&["run", "-m", s, "-p", "x", "--top-p", "2"], "--top-p = 2 is out of range: it must be in [0, 1]");
    expect_failure(&["run", "-m", s, "-p", "x", "--temp=-1"], "--temp = -1 is out of range");
    // Named choices list what they could have been.
    expect_failure(&["run", "-m", s, "-p", "x", "--head", "q5"], "[possible values: stored, q8, q4]");
    expect_failure(&["run", "-m", s, "-p", "x", "--packing", "1bit"], "[possible values: 2bit, 1.6bit]");
    expect_failure(&["run", "-m", s, "-p", "x", "--cache-type", "q8"], "[possible values: f32, f16]");
    expect_failure(&["run", "-m", s, "-p", "x", "--isa", "sse"], "[possible values: scalar, avx2, avx512vnni, cranelift]");
    // An ISA this CPU lacks, where there is one, is refused as such.
    if let Some(isa) = bitnet_codegen::cpu::Isa::ALL.into_iter().find(|i| !i.available()) {
        expect_failure(&["run", "-m", s, "-p", "x", "--isa", isa.name()], &format!("this CPU cannot run {} kernels", isa.name()));
    }
    // Generation stops cleanly when the context fills up.
    let o = bitnet(&["run", "-m", s, "--prompt-ids", "1,403", "-c", "6", "-n", "50", "--greedy", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 5);
}

#[test]
fn synth_refuses_impossible_shapes() {
    let dir = tmp_dir("synth-bad");
    let out = dir.join("x.gguf");
    let o = out.to_str().unwrap();
    expect_failure(
        &["synth", "--shape", "custom", "--hidden", "320", "--layers", "1", "--heads", "4", "--ffn", "512", "--vocab", "100", "--type", "tq2_0", "-o", o],
        "not a multiple of 256",
    );
    expect_failure(
        &["synth", "--shape", "custom", "--hidden", "256", "--layers", "1", "--heads", "4", "--ffn", "200", "--vocab", "100", "--type", "i2_s", "-o", o],
        "not a multiple of 128",
    );
    expect_failure(&["synth", "--type", "q4_0", "-o", o], "unknown type");
    expect_failure(&["synth", "--type", "q8_0", "-o", o], "not a BitLinear weight type");
    assert!(!out.exists(), "a failed synth leaves no file");
}

/// Mutated model files: whatever the parser accepts must load, build a
/// graph and evaluate, or fail with an error; never panic.
#[test]
fn mutated_models_never_panic() {
    let dir = tmp_dir("fuzz-model");
    let good = std::fs::read(tiny_model(&dir)).unwrap();
    let header_len = 4096.min(good.len());
    let mut state = 0x1234_5678u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let mut evaluated = 0;
    for i in 0..300 {
        let mut b = good.clone();
        for _ in 0..1 + next() % 3 {
            let at = next() % header_len;
            if i % 3 == 0 && at + 8 <= b.len() {
                let lie = [0u64, 1, 3, 1 << 16, 1 << 40, u64::MAX][next() % 6];
                b[at..at + 8].copy_from_slice(&lie.to_le_bytes());
            } else {
                b[at] ^= 1 << (next() % 8);
            }
        }
        let Ok(f) = GgufFile::from_vec(b) else { continue };
        let Ok(model) = Model::from_file(f) else { continue };
        let Ok(graph) = model.graph(false) else { continue };
        let interp = Interpreter::new(&model, 1);
        if interp.check_weights(&graph).is_err() {
            continue;
        }
        let inputs = [("tokens", Tensor::ids(vec![1, 2])), ("positions", Tensor::ids(vec![0, 1]))];
        let _ = interp.eval(&graph, &inputs, &mut KvCache::new());
        evaluated += 1;
    }
    assert!(evaluated > 0, "some mutations should still evaluate");
}
