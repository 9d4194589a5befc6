//! `bitnet perplexity`: llama-perplexity's definition on the real trained
//! model, KL divergence against a saved base, and clear errors.

mod common;
use bitnet_runtime::quality::log_softmax;
use bitnet_runtime::{BackendKind, Engine, EngineOptions, LoadOptions, SamplerConfig};
use common::*;
use serde_json::Value;

fn text() -> String {
    data("text/stories.txt").to_str().unwrap().to_string()
}

fn json(args: &[&str]) -> Value {
    let o = bitnet(args);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
}

/// The definition, written out again on the interpreter: windows of `ctx`
/// tokens, BOS first, positions ctx/2 .. ctx-2 score the next token.
fn perplexity_by_hand(ctx: usize) -> (f64, usize) {
    let load = LoadOptions { backend: BackendKind::Interp, threads: 1, ..Default::default() };
    let engine = Engine::open(&stories(), &EngineOptions { load, ..Default::default() }).unwrap();
    let ids = engine.tokenizer.encode(&std::fs::read_to_string(text()).unwrap(), true, false).unwrap();
    let (mut nll, mut n) = (0f64, 0);
    let mut logp = vec![0f64; engine.vocab()];
    for window in ids.chunks_exact(ctx) {
        let mut w = window.to_vec();
        w[0] = 1;
        let mut seq = engine.new_sequence(SamplerConfig::greedy()).unwrap();
        seq.keep_all_logits = true;
        seq.feed(&w);
        engine.step(&mut [&mut seq]).pop().unwrap().unwrap();
        for (pos, row) in seq.logits().chunks_exact(engine.vocab()).enumerate().take(ctx - 1).skip(ctx / 2) {
            log_softmax(row, &mut logp);
            nll -= logp[w[pos + 1] as usize];
            n += 1;
        }
    }
    ((nll / n as f64).exp(), n)
}

#[test]
fn perplexity_follows_llama_perplexity_definition() {
    let m = stories();
    let v = json(&["perplexity", "-m", m.to_str().unwrap(), "-f", &text(), "-c", "64", "-t", "2", "--json"]);
    let (want, scored) = perplexity_by_hand(64);
    let windows = v["windows"].as_u64().unwrap() as usize;
    assert_eq!(v["scored_tokens"].as_u64().unwrap() as usize, scored);
    assert_eq!(scored, windows * 31, "ctx/2 - 1 tokens a window");
    let ppl = v["ppl"].as_f64().unwrap();
    assert!((ppl / want - 1.0).abs() < 1e-4, "compiled {ppl} against the definition on the interpreter {want}");
    // A trained model on text of its kind: far better than chance (512).
    assert!(ppl > 1.5 && ppl < 20.0, "{v}");
    let se = v["ppl_stderr"].as_f64().unwrap();
    assert!(se > 0.0 && se < ppl / 5.0, "{v}");
    // Smaller steps within a window give the same answer.
    let b = json(&["perplexity", "-m", m.to_str().unwrap(), "-f", &text(), "-c", "64", "-b", "7", "-t", "2", "--json"]);
    assert!((b["ppl"].as_f64().unwrap() / ppl - 1.0).abs() < 1e-5, "{b} vs {v}");
}

#[test]
fn kl_divergence_against_a_saved_base() {
    let dir = tmp_dir("perplexity-kl");
    let base = dir.join("stories.kl");
    let (m, b) = (stories(), base.to_str().unwrap().to_string());
    let common = ["perplexity", "-m", m.to_str().unwrap(), "-f", &text(), "-c", "128", "-t", "2"];
    let saved = bitnet(&[&common[..], &["--kl-divergence-base", &b]].concat());
    assert!(saved.status.success(), "{}", stderr(&saved));
    assert!(stdout(&saved).contains("saved the base"), "{}", stdout(&saved));
    let same = json(&[&common[..], &["--kl-divergence-base", &b, "--kl-divergence", "--json"]].concat());
    assert_eq!((same["kl_mean"].as_f64(), same["top1_agreement"].as_f64()), (Some(0.0), Some(1.0)), "{same}");
    assert!((same["base_ppl"].as_f64().unwrap() / same["ppl"].as_f64().unwrap() - 1.0).abs() < 1e-6, "{same}");
    // A lossy head moves the distributions a little, not a lot.
    let q8 = json(&[&common[..], &["--kl-divergence-base", &b, "--kl-divergence", "--head", "q8", "--json"]].concat());
    let kl = q8["kl_mean"].as_f64().unwrap();
    assert!(kl > 1e-6 && kl < 0.02, "{q8}");
    assert!(q8["top1_agreement"].as_f64().unwrap() > 0.9, "{q8}");
    assert!(q8["kl_max"].as_f64().unwrap() >= q8["kl_p99"].as_f64().unwrap());
    let dp = &q8["dp_percentiles"];
    assert!(dp["1"].as_f64().unwrap() <= dp["50"].as_f64().unwrap() && dp["50"].as_f64().unwrap() <= dp["99"].as_f64().unwrap(), "{q8}");

    // An f16 KV cache moves them far less than a q8 head (1e-6 nats).
    let f16 = json(&[&common[..], &["--kl-divergence-base", &b, "--kl-divergence", "--cache-type", "f16", "--json"]].concat());
    let kl16 = f16["kl_mean"].as_f64().unwrap();
    assert!(kl16 > 0.0 && kl16 < 1e-4 && kl16 < kl / 10.0, "{f16}");
    assert!(f16["top1_agreement"].as_f64().unwrap() > 0.99, "{f16}");

    // Another window size, a cut base, and not a base at all: clear errors.
    let other = bitnet(&["perplexity", "-m", m.to_str().unwrap(), "-f", &text(), "-c", "64", "--kl-divergence-base", &b, "--kl-divergence"]);
    assert!(!other.status.success() && stderr(&other).contains("context of 128"), "{}", stderr(&other));
    let bytes = std::fs::read(&base).unwrap();
    let cut = dir.join("cut.kl");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = bitnet(&[&common[..], &["--kl-divergence-base", cut.to_str().unwrap(), "--kl-divergence"]].concat());
    assert!(!o.status.success() && stderr(&o).contains("ends early"), "{}", stderr(&o));
    let o = bitnet(&[&common[..], &["--kl-divergence-base", m.to_str().unwrap(), "--kl-divergence"]].concat());
    assert!(!o.status.success() && stderr(&o).contains("not a base file"), "{}", stderr(&o));
}

#[test]
fn a_text_shorter_than_two_windows_is_refused() {
    let m = stories();
    let o = bitnet(&["perplexity", "-m", m.to_str().unwrap(), "-f", &text(), "-c", "1024"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stderr(&o).contains("needs at least 2048"), "{}", stderr(&o));
    let o = bitnet(&["perplexity", "-m", m.to_str().unwrap(), "-f", "/nonexistent/text.txt"]);
    assert!(!o.status.success() && stderr(&o).contains("/nonexistent/text.txt"), "{}", stderr(&o));
}
