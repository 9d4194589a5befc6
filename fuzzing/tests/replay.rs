//! Replays every fuzz seed (`fuzz/seeds/<target>/`) and every input that
//! ever crashed a target (`fuzz/regressions/<target>/`) through the
//! target's body, so that the normal tests keep what the fuzzer found fixed.
//! `BITNET_UPDATE_BASELINES=1` writes the seeds again (after a format
//! change): small synthetic models in each format, the test data's
//! tokenizer inputs and chat templates, a tuning database, API requests.

use bitnet_autotune::db::{Database, Record};
use bitnet_autotune::space::{Phase, SPACE_VERSION};
use bitnet_codegen::cpu::ternary::TernaryTiles;
use bitnet_codegen::cpu::Isa;
use bitnet_codegen::schedule::{Tiles, WorkloadKey};
use bitnet_frontends::arch::Activation;
use bitnet_frontends::chat::BUILTIN_TEMPLATES;
use bitnet_frontends::synth::{self, ScaleDirection, SynthShape, SynthSpec};
use bitnet_fuzzing::{fuzz_dir, join_parts, target, testdata, TARGETS};
use bitnet_ir::DType;
use bitnet_runtime::{Engine, EngineOptions};
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect()).unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_seed_and_every_past_crash_replays_cleanly() {
    let mut replayed = 0;
    for kind in ["seeds", "regressions"] {
        for entry in std::fs::read_dir(fuzz_dir().join(kind)).unwrap().flatten().filter(|e| e.path().is_dir()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let body = target(&name).unwrap_or_else(|| panic!("fuzz/{kind}/{name}: no target of that name"));
            for f in files(&entry.path()) {
                let data = std::fs::read(&f).unwrap();
                if let Err(e) = std::panic::catch_unwind(|| body(&data)) {
                    let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                    panic!("{} crashes its target: {msg}", f.display());
                }
                replayed += 1;
            }
        }
    }
    assert!(replayed >= 30, "only {replayed} inputs replayed");
}

/// Seeds only help if they get past the parsers: the model-shaped ones
/// open as engines, the others are what their targets parse.
#[test]
fn every_target_has_seeds_that_reach_past_its_parser() {
    if std::env::var_os("BITNET_UPDATE_BASELINES").is_some() {
        write_seeds();
    }
    for (name, _) in TARGETS {
        let seeds = files(&fuzz_dir().join("seeds").join(name));
        assert!(!seeds.is_empty(), "fuzz/seeds/{name} is empty: run this test with BITNET_UPDATE_BASELINES=1");
        for s in &seeds {
            let data = std::fs::read(s).unwrap();
            let opened = match name {
                "model" | "artifact" => {
                    let path = std::env::temp_dir().join(format!("bitnet-seed-{}-{}", std::process::id(), s.file_name().unwrap().to_string_lossy()));
                    std::fs::write(&path, &data).unwrap();
                    let r = Engine::open(&path, &EngineOptions::default()).map(|_| ()).map_err(|e| e.to_string());
                    let _ = std::fs::remove_file(&path);
                    r
                }
                "gguf" => bitnet_frontends::gguf::GgufFile::from_vec(data).map(|_| ()).map_err(|e| e.to_string()),
                "tuning_db" => {
                    let path = std::env::temp_dir().join(format!("bitnet-seed-{}.jsonl", std::process::id()));
                    std::fs::write(&path, &data).unwrap();
                    let loaded = Database::at(&path).load();
                    let _ = std::fs::remove_file(&path);
                    if loaded.records.is_empty() || !loaded.problems.is_empty() {
                        Err(format!("{:?}", loaded.problems))
                    } else {
                        Ok(())
                    }
                }
                _ => Ok(()),
            };
            if let Err(e) = opened {
                panic!("{}: a seed its target refuses: {e}", s.display());
            }
        }
    }
}

fn spec(weight_type: DType, activation: Activation, hidden: usize, head_type: DType) -> SynthSpec {
    SynthSpec {
        shape: SynthShape { hidden, layers: 1, heads: 2, kv_heads: 1, ffn: hidden * 2, vocab: 270 },
        weight_type,
        head_type,
        activation,
        seed: 7,
        context: 64,
        rope_theta: 10000.0,
    }
}

/// Writes every target's seeds into `fuzz/seeds`.
fn write_seeds() {
    let root = fuzz_dir().join("seeds");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let d = root.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    let scratch = std::env::temp_dir().join(format!("bitnet-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();

    // GGUF models: each ternary type, both activations, a quantized head.
    let models = [
        ("i2_s-relu2.gguf", spec(DType::I2S, Activation::Relu2, 128, DType::F16)),
        ("tq2_0-silu.gguf", spec(DType::TQ2_0, Activation::Silu, 256, DType::Q8_0)),
        ("tq1_0-relu2.gguf", spec(DType::TQ1_0, Activation::Relu2, 256, DType::F16)),
    ];
    for (name, s) in &models {
        let p = scratch.join(name);
        synth::write(s, None, &p, |_, _| {}).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        put("gguf", name, &bytes);
        put("model", name, &bytes);
        // The compiled artifact of each, for the AVX2 kernels most CPUs have.
        let mut opts = EngineOptions::default();
        opts.load.tuning = false;
        opts.load.pinned.isa = Some(Isa::Avx2);
        let engine = Engine::open(&p, &opts).unwrap();
        let bnx = scratch.join("a.bnx");
        engine.write_artifact(&bnx, &p).unwrap();
        put("artifact", &name.replace(".gguf", ".bnx"), &std::fs::read(&bnx).unwrap());
    }

    // HF folders: 2B4T's packed layout with each scale direction, one with an index.
    for (name, direction) in [("packed-divide", ScaleDirection::Divide), ("packed-multiply", ScaleDirection::Multiply)] {
        let d = scratch.join(name);
        synth::write_hf(&spec(DType::I2S, Activation::Relu2, 128, DType::F16), None, &d, direction, |_, _| {}).unwrap();
        let config = std::fs::read(d.join("config.json")).unwrap();
        let weights = std::fs::read(d.join("model.safetensors")).unwrap();
        put("hf", name, &join_parts(&[&config, &weights]));
        if direction == ScaleDirection::Divide {
            // The same weights as Falcon3 / Llama3-8B-1.58 declare them:
            // LlamaForCausalLM with quant_method bitnet, an explicit head_dim.
            let mut c: serde_json::Value = serde_json::from_slice(&config).unwrap();
            c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
            c["model_type"] = "llama".into();
            c["head_dim"] = 64.into();
            c["quantization_config"] = serde_json::json!({"modules_to_not_convert": ["lm_head"], "quant_method": "bitnet"});
            put("hf", "llama-bitnet", &join_parts(&[c.to_string().as_bytes(), &weights]));
            let index = br#"{"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"}}"#;
            put("hf", "indexed", &join_parts(&[&config, &weights, index]));
        }
    }

    // Tokenizer inputs: llama.cpp's tokenizer test texts, for each tokenizer.
    let inp = std::fs::read_to_string(testdata().join("tokenizers/llama-cpp-vocab/ggml-vocab-llama-bpe.gguf.inp")).unwrap();
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    for which in 0..4u8 {
        let mut all = vec![which, 0];
        all.extend_from_slice(texts.join("").as_bytes());
        put("tokenizer", &format!("{which}-tests"), &all);
        let mut special = vec![which, 4];
        special.extend_from_slice("<|begin_of_text|>Hi<|eot_id|> <s>[INST] ok [/INST]\u{1F600}\r\n".as_bytes());
        put("tokenizer", &format!("{which}-special"), &special);
        let ids: Vec<u8> = [which, 1].into_iter().chain([1u32, 15043, 29871, 128000, 0xFF, 220, 50256].iter().flat_map(|i| i.to_le_bytes())).collect();
        put("tokenizer", &format!("{which}-decode"), &ids);
    }

    // Chat templates: the built-ins and LLaMA-3's own, with a conversation.
    let llama3: serde_json::Value = serde_json::from_slice(&std::fs::read(testdata().join("tokenizers/llama3-hf/tokenizer_config.json")).unwrap()).unwrap();
    let mut templates: Vec<(String, String)> = BUILTIN_TEMPLATES.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect();
    templates.push(("llama3-hf".into(), llama3["chat_template"].as_str().unwrap().to_string()));
    for (name, t) in &templates {
        put("chat_template", name, &join_parts(&[t.as_bytes(), b"You are terse.", b" Hi there ", b"Hello!", b"What is 1.58 bits?"]));
    }

    // A tuning database with CPU records of each ISA and phase.
    let db_path = scratch.join("tuning.jsonl");
    let records: Vec<Record> = [(Isa::Avx2, Phase::Decode, 4, 1), (Isa::Avx512Vnni, Phase::Prefill, 4, 4), (Isa::Scalar, Phase::Decode, 1, 1)]
        .into_iter()
        .map(|(isa, phase, rows, tokens)| Record {
            key: WorkloadKey("ternary_matmul n=256 k=128".into()),
            phase,
            fingerprint: "cpu-seed".into(),
            threads: 2,
            space: SPACE_VERSION,
            tiles: Tiles::Ternary(TernaryTiles { isa, rows, tokens, split: Default::default(), packing: Default::default() }),
            ns: Some(1000),
            status: "ok".into(),
            at: 1,
        })
        .collect();
    Database::at(&db_path).merge(&records).unwrap();
    put("tuning_db", "three-records.jsonl", &std::fs::read(&db_path).unwrap());

    // API requests: byte 0 picks the endpoint (chat, completions, tokenize, detokenize).
    let requests: [(u8, &str, &str); 10] = [
        (
            0,
            "chat",
            r#"{"model":"stories","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Tell a story"}],"max_tokens":4,"temperature":0}"#,
        ),
        (
            0,
            "chat-stream",
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"Once"}]}],"max_tokens":3,"stream":true,"stream_options":{"include_usage":true},"logprobs":true,"top_logprobs":2}"#,
        ),
        (1, "completion", r#"{"prompt":"Once upon a time","max_tokens":4,"temperature":0.7,"top_p":0.9,"seed":3,"stop":[" the","."],"presence_penalty":0.5}"#),
        (1, "completion-stream", r#"{"prompt":"Lily","max_tokens":3,"stream":true,"logprobs":2,"frequency_penalty":1}"#),
        (2, "tokenize", r#"{"content":"Hello world","add_special":true}"#),
        (3, "detokenize", r#"{"tokens":[1,300,400]}"#),
        (0, "bad-n", r#"{"messages":[{"role":"user","content":"x"}],"n":17}"#),
        (1, "completion-n", r#"{"prompt":"Once","max_tokens":3,"temperature":1,"seed":2,"n":3}"#),
        (0, "chat-n-stream", r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":2,"n":2,"stream":true}"#),
        (1, "completion-gbnf", r#"{"prompt":"Hi","max_tokens":6,"grammar":"root ::= [A-Z] [a-z]{1,4} (\" \" ( \"cat\" | [^\\n.] ))* \".\""}"#),
    ];
    for (which, name, body) in requests {
        put("openai_request", name, &[&[which][..], body.as_bytes()].concat());
    }

    // GBNF grammars: rules over lines, classes, escapes, repetitions.
    let grammars = [
        ("list.gbnf", "# a list\nroot ::= item (\", \" item){0,2} \".\"\nitem ::= [a-z]+ \" \"\n  ( \"cat\" | \"dog\" )\n"),
        ("escapes.gbnf", "root ::= \"\\x41\\u00e9\\n\" [^\"\\\\] . [\\t-\\r]? ws\nws ::= [ \\t\\n]*\n"),
    ];
    for (name, g) in grammars {
        put("gbnf", name, g.as_bytes());
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
