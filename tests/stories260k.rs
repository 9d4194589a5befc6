//! The real trained model: greedy decoding must give llama.cpp's answer.

mod common;
use bitnet_runtime::{GenerateOptions, LoadOptions, SamplerConfig, Session};
use common::*;

const PROMPT: [u32; 5] = [1, 403, 407, 261, 378];
const EXPECTED: [u32; 20] = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292];

fn greedy(threads: usize) -> Vec<u32> {
    let mut s = Session::load(&stories(), &LoadOptions { threads, ..Default::default() }).unwrap();
    let opts = GenerateOptions { n_predict: 20, ignore_eos: false, sampler: SamplerConfig::greedy(), dump_logits: false };
    s.generate(&PROMPT, &opts, |_| {}).unwrap().generated_ids
}

#[test]
fn greedy_ids_match_the_known_continuation() {
    assert_eq!(greedy(1), EXPECTED);
    assert_eq!(greedy(2), EXPECTED, "results must not depend on the thread count");
}

#[test]
fn cli_prints_the_story() {
    let o = bitnet(&["run", "-m", stories().to_str().unwrap(), "-p", "Once upon a time", "-n", "20", "--greedy"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("Once upon a time, there was a little girl named Lily"), "{}", stdout(&o));
}

#[test]
fn cli_json_contract() {
    let o = bitnet(&["run", "-m", stories().to_str().unwrap(), "--prompt-ids", "1,403,407,261,378", "-n", "20", "--temp", "0", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "exactly one line: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["prompt_ids"], serde_json::json!(PROMPT));
    assert_eq!(v["generated_ids"], serde_json::json!(EXPECTED));
    assert!(v["text"].as_str().unwrap().starts_with(", there was a little girl named Lily"));
    // Loading, a 5-token prefill and 19 decode steps all take time.
    for k in ["load_ms", "prefill_tok_s", "decode_tok_s"] {
        let x = v[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {v}"));
        assert!(x > 0.0 && x.is_finite(), "{k}: {x}");
    }
}

#[test]
fn dumped_logits_cover_every_evaluated_position() {
    let dir = tmp_dir("dump");
    let npy = dir.join("logits.npy");
    let o =
        bitnet(&["run", "-m", stories().to_str().unwrap(), "--prompt-ids", "1,403,407,261,378", "-n", "4", "--greedy", "--dump-logits", npy.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&npy).unwrap();
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(header.contains("'shape': (8, 512)"), "5 prompt rows + 3 fed back: {header}");
    let data: Vec<f32> = bytes[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(data.len(), 8 * 512);
    // Row 4 (the last prompt position) predicts the first generated id.
    let row4 = &data[4 * 512..5 * 512];
    assert_eq!(bitnet_runtime::sampler::argmax(row4), EXPECTED[0]);
    let row7 = &data[7 * 512..8 * 512];
    assert_eq!(bitnet_runtime::sampler::argmax(row7), EXPECTED[3]);
}

#[test]
fn logit_biases_force_and_ban_tokens() {
    let model = stories();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "-m", model.to_str().unwrap(), "--prompt-ids", "1,403,407,261,378", "--json"];
        args.extend(extra);
        let o = bitnet(&args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        let v: Vec<u32> = serde_json::from_value(serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()["generated_ids"].clone()).unwrap();
        v
    };
    let greedy = ["-n", "6", "--temp", "0"];
    assert_eq!(run(&[&greedy[..], &["-l", "300+100"]].concat()), [300; 6], "a bias of +100 wins every step");
    // Banning the greedy first token changes it; banning with -inf holds
    // at any temperature.
    let banned = format!("{}-inf", EXPECTED[0]);
    let other = run(&[&greedy[..], &["--logit-bias", &banned]].concat());
    assert_ne!(other[0], EXPECTED[0]);
    let hot = run(&["--logit-bias", &banned, "--logit-bias", "300-inf", "--temp", "2", "--top-k", "0", "--min-p", "0", "--seed", "3", "-n", "32"]);
    assert!(!hot.contains(&EXPECTED[0]) && !hot.contains(&300), "{hot:?}");
    let fails = |l: &str, want: &str| {
        let o = bitnet(&["run", "-m", model.to_str().unwrap(), "-p", "Once", "-n", "2", "--logit-bias", l]);
        assert!(!o.status.success() && stderr(&o).contains(want), "{l}: {}", stderr(&o));
    };
    fails("512+1", "token id 512 is outside the vocabulary of 512");
    fails("15043", "is not TOKEN_ID+BIAS");
    fails("x+1", "\"x\" is not a token id");
    fails("3+one", "is not a bias");
    fails("3+inf", "--logit-bias = inf is out of range");
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let run = |seed: &str| {
        let out = stdout(&bitnet(&["run", "-m", stories().to_str().unwrap(), "-p", "Once upon a time", "-n", "16", "--seed", seed, "--json"]));
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["generated_ids"].clone()
    };
    assert_eq!(run("42"), run("42"));
    let many: std::collections::HashSet<String> = (0..6).map(|s| run(&s.to_string()).to_string()).collect();
    assert!(many.len() > 1, "different seeds should not all sample the same text");
}

#[test]
fn bench_json_times_each_kernel_family() {
    let o = bitnet(&["bench", "-m", stories().to_str().unwrap(), "-p", "8", "-n", "2", "-r", "1", "-t", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    for k in ["prefill_tok_s", "decode_tok_s", "load_ms", "cold_start_ms", "peak_rss_bytes"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}");
    }
    // stories260K has 5 layers: one attention call each, per evaluation.
    for k in ["prefill_kernel_ms", "decode_kernel_ms"] {
        let s = v[k].as_str().unwrap_or_else(|| panic!("{k} missing"));
        assert!(s.contains("attention ") && s.contains(" (5)") && s.contains("matmul ") && s.contains("executor "), "{k}: {s}");
    }
    assert!(v.get("parallel").is_none(), "{v}");
    // An untimed prefill and decode step first, as llama-bench does, unless --no-warmup.
    assert_eq!(v["warmup"], true, "{v}");
    assert_eq!(v["cache_type"], "f32", "{v}");
    let o = bitnet(&["bench", "-m", stories().to_str().unwrap(), "-p", "4", "-n", "1", "-r", "1", "--no-warmup", "--cache-type", "f16", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cold: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!((&cold["warmup"], &cold["cache_type"]), (&false.into(), &"f16".into()), "{cold}");
    let o = bitnet(&["bench", "-m", stories().to_str().unwrap(), "-p", "4", "-n", "1", "--cache-type", "f8"]);
    assert!(!o.status.success() && stderr(&o).contains("[possible values: f32, f16]"), "{}", stderr(&o));
    // Refused before anything loads, GPU or not.
    let o = bitnet(&["bench", "-m", stories().to_str().unwrap(), "-p", "4", "-n", "1", "--cache-type", "f16", "--device", "cuda"]);
    assert!(!o.status.success() && stderr(&o).contains("an f16 KV cache is for the CPU"), "{}", stderr(&o));
    // Which kernels ran, and why: the best this CPU has unless pinned.
    assert_eq!(v["isa"], bitnet_codegen::cpu::Isa::best().name(), "{v}");
    let o = bitnet(&["bench", "-m", stories().to_str().unwrap(), "-p", "4", "-n", "1", "-r", "1", "--isa", "scalar"]);
    assert!(o.status.success() && stdout(&o).contains("CPU kernels: scalar (chosen with --isa)"), "{}", stdout(&o));
    // N sequences at once: their decode rate all together, beside the single one.
    let o = bitnet(&["bench", "-m", stories().to_str().unwrap(), "-p", "8", "-n", "4", "-r", "1", "--parallel", "3", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["parallel"], 3);
    assert!(v["aggregate_decode_tok_s"].as_f64().unwrap() > 0.0 && v["decode_tok_s"].as_f64().unwrap() > 0.0, "{v}");
    let o = bitnet(&["bench", "-m", stories().to_str().unwrap(), "-p", "4", "-n", "1", "-r", "1", "--backend", "interp", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v.get("prefill_kernel_ms").is_none() && v.get("isa").is_none(), "the interpreter has no kernels to time: {v}");
    assert!(v.get("roofline_fraction").is_none(), "{v}");
}

/// The roofline figures: the weight bytes a decode step reads (every
/// matrix whole, one embedding row), the read bandwidth, their ratio; a
/// quantized head reads fewer bytes, by exactly what it saves.
#[test]
fn bench_reports_the_bytes_a_token_reads_and_the_roofline() {
    let report = |head: &str| -> serde_json::Value {
        let o = bitnet(&["bench", "-m", stories().to_str().unwrap(), "-p", "4", "-n", "2", "-r", "1", "--head", head, "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let (stored, q8, q4) = (report("stored"), report("q8"), report("q4"));
    // stories260K, f32: 5 layers of q, k, v, o (64x64, 32x64 for k and v:
    // 4 KV heads of 8) and gate, up, down (172x64), norms, the final norm,
    // the untied 512x64 head, one 64-wide embedding row.
    let layer = (64 * 64 * 2 + 32 * 64 * 2 + 3 * 172 * 64 + 2 * 64) * 4;
    let head = 512 * 64 * 4;
    assert_eq!(stored["bytes_per_token"], 5 * layer + 64 * 4 + head + 64 * 4, "{stored}");
    let b = |v: &serde_json::Value| v["bytes_per_token"].as_u64().unwrap() as usize;
    // int8: 512 rows of 128 (64 padded to a block) and a scale each;
    // 4 bits: 512 rows of 64 bytes and 4 f16 scales.
    assert_eq!(b(&stored) - b(&q8), head - (512 * 128 + 512 * 4), "{q8}");
    assert_eq!(b(&stored) - b(&q4), head - (512 * 64 + 512 * 4 * 2), "{q4}");
    for v in [&stored, &q8, &q4] {
        assert!(v["bandwidth_gbs"].as_f64().unwrap() > 0.1, "{v}");
        let expected = v["decode_tok_s"].as_f64().unwrap() * b(v) as f64 / (v["bandwidth_gbs"].as_f64().unwrap() * 1e9);
        assert!((v["roofline_fraction"].as_f64().unwrap() / expected - 1.0).abs() < 1e-9, "{v}");
    }
    assert_eq!((stored["head"].as_str(), q8["head"].as_str(), q4["head"].as_str()), (Some("stored"), Some("q8"), Some("q4")));
    // A float model has no packed ternary weights; a ternary one has them
    // two or 1.6 bits a code: as pinned, else as the machine's calibration
    // (or the tuning database) chose, which the text report says.
    assert_eq!(stored["weight_layout"], "none", "{stored}");
    let dir = tmp_dir("bench-layout");
    let path = dir.join("m.gguf");
    write_synth(&small_spec(bitnet_ir::DType::I2S, bitnet_frontends::arch::Activation::Relu2), &path);
    let layout = |extra: &[&str]| {
        let mut args = vec!["bench", "-m", path.to_str().unwrap(), "-p", "4", "-n", "2", "-r", "1", "--json"];
        args.extend_from_slice(extra);
        let o = bitnet(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        v["weight_layout"].as_str().unwrap().to_string()
    };
    assert_eq!(layout(&["--packing", "2bit"]), "2bit");
    assert_eq!(layout(&["--packing", "1.6bit"]), "1.6bit");
    assert!(["2bit", "1.6bit"].contains(&layout(&[]).as_str()));
    let o = bitnet(&["bench", "-m", path.to_str().unwrap(), "-p", "4", "-n", "2", "-r", "1", "--packing", "1.6bit"]);
    assert!(stdout(&o).contains("ternary products: ") && stdout(&o).contains(" 1.6bit (pinned)"), "{}", stdout(&o));
    let o = bitnet(&["bench", "-m", path.to_str().unwrap(), "-p", "4", "-n", "2", "-r", "1", "--packing", "1.6bit", "--isa", "cranelift"]);
    assert!(!o.status.success() && stderr(&o).contains("1.6bit weights need avx2, avx512vnni or scalar"), "{}", stderr(&o));
    std::fs::remove_dir_all(dir).ok();
}
