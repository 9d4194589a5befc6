//! Every published 1.58-bit family at a reduced size (`bitnet synth
//! --family NAME`): the HF folder, the I2_S GGUF bitnet.cpp's converter
//! would write, TQ2_0 for llama.cpp, the way back to I2_S and a compiled
//! artifact all generate the same tokens (bitnet-3b: the folder and the
//! artifact, on both backends; its FFN rows fit no GGUF ternary type); each is recognized as its family;
//! each instruct family's chat prompt and end of turn are its own.

mod common;
use bitnet_frontends::chat::Message;
use bitnet_frontends::family::{self, Family, Match, FAMILIES};
use bitnet_frontends::gguf::{GgufFile, MetaValue};
use bitnet_frontends::model::Model;
use bitnet_ir::interp::{Interpreter, KvCache, Tensor};
use bitnet_runtime::{BackendKind, Engine, EngineOptions, LoadOptions, Session};
use common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn engine_on(path: &Path, backend: BackendKind) -> Arc<Engine> {
    let load = LoadOptions { threads: 2, backend, ..Default::default() };
    Arc::new(Engine::open(path, &EngineOptions { load, ..Default::default() }).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn engine(path: &Path) -> Arc<Engine> {
    engine_on(path, BackendKind::Compiled)
}

fn greedy(path: &Path, prompt: &[u32]) -> Vec<u32> {
    greedy_on(path, prompt, BackendKind::Compiled)
}

fn greedy_on(path: &Path, prompt: &[u32], backend: BackendKind) -> Vec<u32> {
    let mut s = Session::new(engine_on(path, backend));
    let opts = bitnet_runtime::GenerateOptions { n_predict: 12, ignore_eos: true, sampler: bitnet_runtime::SamplerConfig::greedy(), dump_logits: false };
    s.generate(prompt, &opts, |_| {}).unwrap().generated_ids
}

fn logits(path: &Path, prompt: &[u32]) -> Vec<f32> {
    let model = Model::open(path).unwrap();
    let g = model.graph(true).unwrap();
    let inputs = [("tokens", Tensor::ids(prompt.iter().map(|&t| t as i32).collect())), ("positions", Tensor::ids((0..prompt.len() as i32).collect()))];
    let mut out = Interpreter::new(&model, 2).eval(&g, &inputs, &mut KvCache::new()).unwrap();
    out.pop().unwrap().as_f32().unwrap().to_vec()
}

fn run_ok(args: &[&str]) {
    let o = bitnet(args);
    assert!(o.status.success(), "bitnet {}: {}", args.join(" "), stderr(&o));
}

/// The family's files: HF folder, an artifact compiled from the folder,
/// and where the family's rows fit GGUF's ternary types, synth's GGUF,
/// TQ2_0 from the folder and I2_S back from TQ2_0. Where they do not
/// (bitnet_b1_58-3B's FFN), `synth --format gguf` and `convert` say so.
fn files(f: &Family, dir: &Path) -> (PathBuf, PathBuf, Option<[PathBuf; 3]>) {
    let p = |s: &str| dir.join(format!("{}{s}", f.name));
    let (hf, gguf, tq2, back, bnx) = (p("-hf"), p(".gguf"), p("-tq2_0.gguf"), p("-back.gguf"), p(".bnx"));
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    run_ok(&["synth", "--family", f.name, "--format", "hf", "-o", &s(&hf)]);
    run_ok(&["compile", "-m", &s(&hf), "-o", &s(&bnx), "--no-tune"]);
    if !f.tiny.ffn.is_multiple_of(256) {
        for args in [vec!["synth", "--family", f.name, "--format", "gguf", "-o", &s(&gguf)], vec!["convert", &s(&hf), "--type", "tq2_0", "-o", &s(&tq2)]] {
            let o = bitnet(&args);
            let e = stderr(&o);
            assert!(!o.status.success() && e.contains("ffn_down.weight: row length") && e.contains("bitnet compile"), "bitnet {}: {e}", args.join(" "));
        }
        return (hf, bnx, None);
    }
    run_ok(&["synth", "--family", f.name, "--format", "gguf", "-o", &s(&gguf)]);
    run_ok(&["convert", &s(&hf), "--type", "tq2_0", "-o", &s(&tq2)]);
    run_ok(&["convert", &s(&tq2), "--type", "i2_s", "-o", &s(&back)]);
    (hf, bnx, Some([gguf, tq2, back]))
}

fn arch(p: &Path) -> String {
    GgufFile::open(p).unwrap().get("general.architecture").and_then(MetaValue::as_str).unwrap().to_string()
}

#[test]
fn every_family_runs_the_same_from_each_format() {
    let dir = tmp_dir("families");
    for f in &FAMILIES {
        let (hf, bnx, ggufs) = files(f, &dir);
        let m = Model::open(&hf).unwrap();
        let c = &m.config;
        let d = f.tiny;
        assert!(c.bitlinear, "{}", f.name);
        assert_eq!((c.sub_norms, c.tied_head, c.activation), (f.sub_norms, f.tied, f.activation), "{}", f.name);
        assert_eq!(
            (c.hidden, c.layers, c.heads, c.kv_heads, c.head_dim, c.ffn, c.vocab),
            (d.hidden, d.layers, d.heads, d.kv_heads, d.head_dim, d.ffn, d.vocab),
            "{}",
            f.name
        );
        assert_eq!((c.rope_theta, c.norm_eps), (f.rope_theta, f.norm_eps), "{}", f.name);
        for p in std::iter::once(&hf).chain(ggufs.iter().flatten()) {
            let m = Model::open(p).unwrap();
            assert_eq!(family::infer(&m).map(|(g, how)| (g.name, how)), Some((f.name, Match::Named)), "{}", p.display());
        }
        // The Hub's folder name names the family too (no _name_or_path).
        let renamed = dir.join(f.repo.rsplit('/').next().unwrap());
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
        config.as_object_mut().unwrap().remove("_name_or_path");
        copy_dir(&hf, &renamed);
        std::fs::write(renamed.join("config.json"), config.to_string()).unwrap();
        let by_folder = family::infer(&Model::open(&renamed).unwrap()).map(|(g, _)| g.name);
        // Where the repository's name contains the family's (Llama3-8B-1.58, Falcon3, Falcon-E).
        if f.repo.to_lowercase().contains(f.name) {
            assert_eq!(by_folder, Some(f.name), "{}", renamed.display());
        }
        // Mid-vocabulary ids: the tiny vocabularies' first 256 are bytes.
        let prompt: Vec<u32> = [300u32, 20, 400, 77, 5, 260, 150].iter().map(|&t| t % d.vocab as u32).collect();
        let want_ids = greedy(&hf, &prompt);
        assert_eq!(greedy(&bnx, &prompt), want_ids, "{}: the artifact generates what the HF folder does", f.name);
        let Some([gguf, tq2, back]) = ggufs else {
            // No GGUF to hold the interpreter to: it and the compiled kernels
            // (rows padded to whole blocks) agree on the folder itself.
            assert_eq!(greedy_on(&hf, &prompt, BackendKind::Interp), want_ids, "{}: interpreter and compiled kernels", f.name);
            continue;
        };
        assert_eq!(arch(&gguf), f.gguf_arch, "{}: synth writes bitnet.cpp's arch name", f.name);
        let pre = GgufFile::open(&gguf).unwrap().get("tokenizer.ggml.pre").and_then(MetaValue::as_str).map(String::from);
        let want = match f.vocab {
            family::Vocab::Llama3 => Some("llama-bpe"),
            family::Vocab::Falcon3 => Some("falcon3"),
            family::Vocab::Llama2Spm => None,
        };
        assert_eq!(pre.as_deref(), want, "{}: pre-tokenizer", f.name);
        // Digits one at a time in Falcon3's split, the folder's tokenizer.json and the GGUF alike.
        let digits = |p: &Path| engine(p).tokenizer.encode("in 2024", false, false).unwrap().len();
        if f.vocab == family::Vocab::Falcon3 {
            assert_eq!((digits(&hf), digits(&gguf)), (7, 7), "{}", f.name);
        }
        assert_eq!(arch(&back), f.gguf_arch, "{}: so does convert --type i2_s", f.name);

        for p in [&gguf, &tq2, &back] {
            assert_eq!(greedy(p, &prompt), want_ids, "{}: {} generates what the HF folder does", f.name, p.display());
        }
        let direct = logits(&hf, &prompt);
        // Synthetic scales are powers of two, so even the TQ2_0 `llama`
        // files (β in f16 block scales: llama.cpp's `llama` graph applies no
        // scale tensors) hold the same numbers as the folder.
        for p in [&gguf, &tq2, &back] {
            let l = logits(p, &prompt);
            let (cos, diff) = (cosine(&l, &direct), max_abs_diff(&l, &direct));
            let ok = cos > 0.99999 && diff < 1e-2;
            assert!(ok, "{}: {}: cosine {cos}, max diff {diff}", f.name, p.display());
        }
    }
}

#[test]
fn instruct_families_render_their_turns_and_stop_at_their_end_of_turn() {
    let dir = tmp_dir("families-chat");
    let msgs = [Message::new("system", "Be brief."), Message::new("user", "Hi"), Message::new("assistant", "Hello."), Message::new("user", "Bye")];
    for (name, starts, ends) in [
        ("bitnet-2b4t", "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi<|eot_id|>", "User: Bye<|eot_id|>Assistant: "),
        (
            "llama3-8b-1.58",
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        ("falcon3-1b", "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.<|endoftext|>\n", "<|user|>\nBye\n<|assistant|>\n"),
    ] {
        let f = family::by_name(name).unwrap();
        let hf = dir.join(name);
        synth_family(f, &hf, "hf");
        let gguf = dir.join(format!("{name}.gguf"));
        synth_family(f, &gguf, "gguf");
        for p in [&hf, &gguf] {
            let e = engine(p);
            let tok = &e.tokenizer;
            let ids = e.chat_ids(&msgs).unwrap();
            let text: String = ids.iter().map(|&i| tok.piece(i).unwrap().to_string()).collect::<String>();
            let text = text.replace('\u{120}', " ").replace('\u{10a}', "\n");
            assert!(text.starts_with(starts) && text.ends_with(ends), "{name} {}: {text:?}", p.display());
            let id = |s: &str| tok.encode(s, false, true).unwrap();
            let eot = id(f.end_of_turn);
            assert_eq!(eot.len(), 1, "{name}: {} is one token", f.end_of_turn);
            assert!(tok.is_eog(eot[0]), "{name} {}: {} ends generation", p.display(), f.end_of_turn);
            assert_eq!(ids.iter().filter(|&&i| i == eot[0]).count(), if name == "falcon3-1b" { 1 } else { 4 }, "{name}: closed turns");
        }
    }
    // A base family has no template: chat asks for one by name.
    let large = dir.join("bitnet-large");
    synth_family(family::by_name("bitnet-large").unwrap(), &large, "hf");
    let e = engine(&large).chat_ids(&msgs).unwrap_err().to_string();
    assert!(e.contains("--chat-template") && e.contains("falcon3"), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn synth_family(f: &Family, out: &Path, format: &str) {
    run_ok(&["synth", "--family", f.name, "--format", format, "-o", out.to_str().unwrap()]);
}

#[test]
fn unknown_families_and_unpublished_shapes_are_refused_by_name() {
    let dir = tmp_dir("families-refused");
    let out = dir.join("x");
    let e = bitnet(&["synth", "--family", "falcon-e-3b", "--size", "full", "-o", out.to_str().unwrap()]);
    assert!(!e.status.success() && stderr(&e).contains("config.json") && !out.exists(), "{}", stderr(&e));
    let e = bitnet(&["synth", "--family", "falcon4", "-o", out.to_str().unwrap()]);
    assert!(!e.status.success() && stderr(&e).contains("bitnet-2b4t, bitnet-large"), "{}", stderr(&e));
}

/// Configuration outside what the engine implements is refused with the
/// key that says so, not run wrong.
#[test]
fn configurations_the_engine_does_not_know_are_refused_by_key() {
    let dir = tmp_dir("families-keys");
    let hf = dir.join("falcon3");
    synth_family(family::by_name("falcon3-1b").unwrap(), &hf, "hf");
    let original = std::fs::read_to_string(hf.join("config.json")).unwrap();
    let cases: [(&str, serde_json::Value, &str); 7] = [
        ("/rope_scaling", serde_json::json!({"type": "linear", "factor": 2.0}), "rope_scaling"),
        ("/attention_bias", serde_json::json!(true), "attention_bias"),
        ("/quantization_config/use_rms_norm", serde_json::json!(true), "use_rms_norm"),
        ("/quantization_config/quant_method", serde_json::json!("gptq"), "quant_method"),
        ("/quantization_config/linear_class", serde_json::json!("ternarylinear"), "linear_class"),
        ("/quantization_config/modules_to_not_convert", serde_json::json!(["lm_head", "model.layers.0.mlp.down_proj"]), "modules_to_not_convert"),
        ("/hidden_act", serde_json::json!("gelu"), "hidden_act"),
    ];
    for (pointer, value, key) in cases {
        let mut c: serde_json::Value = serde_json::from_str(&original).unwrap();
        let (parent, leaf) = pointer.rsplit_once('/').unwrap();
        c.pointer_mut(if parent.is_empty() { "" } else { parent }).unwrap()[leaf] = value;
        std::fs::write(hf.join("config.json"), c.to_string()).unwrap();
        let e = Model::open(&hf).err().unwrap_or_else(|| panic!("{pointer}: accepted")).to_string();
        assert!(e.contains(key), "{pointer}: {e}");
    }
    // A head size the tensors do not have: refused by run and by convert, not a panic.
    let mut c: serde_json::Value = serde_json::from_str(&original).unwrap();
    c["head_dim"] = 96.into();
    std::fs::write(hf.join("config.json"), c.to_string()).unwrap();
    let m = Model::open(&hf).unwrap();
    assert!(m.graph(false).err().unwrap().to_string().contains("attn_q"));
    let opts = bitnet_frontends::convert::ConvertOptions { weight_type: bitnet_ir::DType::I2S, head_type: None };
    let e = bitnet_frontends::convert::convert(&m, &opts, &dir.join("x.gguf"), |_, _| {}).unwrap_err();
    assert!(e.contains("heads of 96 rows"), "{e}");
    std::fs::write(hf.join("config.json"), original).unwrap();
    Model::open(&hf).unwrap();
    // A folder with only SentencePiece's tokenizer.model (as the 1bitLLM
    // repositories ship it) says how to get the tokenizer.json it needs.
    std::fs::rename(hf.join("tokenizer.json"), hf.join("tokenizer.model")).unwrap();
    let e = Model::open(&hf).unwrap().tokenizer().err().expect("no tokenizer.json").to_string();
    assert!(e.contains("tokenizer.model") && e.contains("save_pretrained"), "{e}");
}
