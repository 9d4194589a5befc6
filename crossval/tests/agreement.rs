//! bitnet-rs against llama.cpp on stories260K and tiny synthetic models.
//! Run with `cargo test -p bitnet-crossval` (it builds llama.cpp).

use bitnet_crossval::*;
use bitnet_frontends::arch::ActivationMode;
use bitnet_frontends::synth::SynthShape;
use bitnet_ir::RopeMode;
use bitnet_runtime::{GenerateOptions, LoadOptions, SamplerConfig, Session};
use std::path::PathBuf;
use std::sync::OnceLock;

fn stories() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/models/stories260K/stories260K.gguf");
    assert!(p.exists(), "{} is missing (testdata/ is part of the repository)", p.display());
    p
}

fn tiny_cases() -> &'static Vec<Case> {
    static CASES: OnceLock<Vec<Case>> = OnceLock::new();
    CASES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("bitnet-crossval-{}", std::process::id()));
        synth_cases(&dir, SynthShape::tiny(), "tiny").unwrap()
    })
}

#[test]
fn stories_greedy_tokens_are_identical() {
    let prompt = [1, 403, 407, 261, 378];
    let theirs = Llama::load(&stories(), 2).unwrap().greedy(&prompt, 20).unwrap();
    let mut s = Session::load(&stories(), &LoadOptions { threads: 2, ..Default::default() }).unwrap();
    let opts = GenerateOptions { n_predict: 20, ignore_eos: true, sampler: SamplerConfig::greedy(), dump_logits: false };
    let ours = s.generate(&prompt, &opts, |_| {}).unwrap().generated_ids;
    assert_eq!(ours, theirs);
}

#[test]
fn stories_logits_agree() {
    let r = check(&stories_case(&stories()), 2).unwrap();
    eprintln!("stories260K: {} | same math: {}", r.model, r.same_math);
    assert!(r.model.min_cosine >= SAME_MATH_MIN_COSINE, "{}", r.model);
    assert_eq!(r.model.top1_agree, r.model.positions);
}

#[test]
fn synthetic_ternary_models_agree() {
    for case in tiny_cases() {
        let r = check(case, 2).unwrap();
        eprintln!("{}: model numerics {} | same math {}", case.name, r.model, r.same_math);
        assert!(r.model.min_cosine >= MODEL_NUMERICS_MIN_COSINE, "{}: {}", case.name, r.model);
        assert!(r.same_math.min_cosine >= SAME_MATH_MIN_COSINE, "{}: {}", case.name, r.same_math);
    }
}

#[test]
fn a_wrong_model_fails_the_check() {
    // The right weights with the wrong RoPE pairing must not pass.
    let case = &tiny_cases()[0];
    let llama = Llama::load(&case.llama_path, 2).unwrap();
    let theirs = llama.logits(&case.tokens).unwrap();
    for mode in [ActivationMode::Model, ActivationMode::LlamaCpp] {
        let ours = bitnet_logits(&case.path, &case.tokens, mode, Some(RopeMode::Interleaved), 2).unwrap();
        let r = compare(&ours, &theirs, llama.n_vocab()).unwrap();
        eprintln!("flipped RoPE ({mode:?}): {r}");
        assert!(r.min_cosine < MODEL_NUMERICS_MIN_COSINE, "a flipped RoPE passed: {r}");
    }
}

#[test]
fn a_converted_hf_checkpoint_runs_in_llama_cpp() {
    use bitnet_frontends::arch::Activation;
    use bitnet_frontends::convert::{convert, ConvertOptions};
    use bitnet_frontends::model::Model;
    use bitnet_frontends::synth::{write_hf, ScaleDirection, SynthSpec};
    use bitnet_ir::DType;
    let dir = std::env::temp_dir().join(format!("bitnet-crossval-hf-{}", std::process::id()));
    let folder = dir.join("hf");
    let spec = SynthSpec {
        shape: SynthShape::tiny(),
        weight_type: DType::I2S,
        head_type: DType::F16,
        activation: Activation::Silu,
        seed: 3,
        context: 4096,
        rope_theta: 500000.0,
    };
    write_hf(&spec, None, &folder, ScaleDirection::Divide, |_, _| {}).unwrap();
    let gguf = dir.join("tq2_0.gguf");
    convert(&Model::open(&folder).unwrap(), &ConvertOptions { weight_type: DType::TQ2_0, head_type: None }, &gguf, |_, _| {}).unwrap();
    let case =
        Case { name: "hf → tq2_0".into(), path: gguf.clone(), llama_path: gguf, tokens: vec![256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100] };
    let r = check(&case, 2).unwrap();
    eprintln!("converted HF checkpoint: model numerics {} | same math {}", r.model, r.same_math);
    assert!(r.passed(), "{} | {}", r.model, r.same_math);
    // And bitnet-rs running the folder itself agrees with llama.cpp on the converted file.
    let ours = bitnet_logits(&folder, &case.tokens, ActivationMode::Model, None, 2).unwrap();
    let theirs = Llama::load(&case.llama_path, 2).unwrap().logits(&case.tokens).unwrap();
    let r = compare(&ours, &theirs, 32000).unwrap();
    assert!(r.min_cosine >= MODEL_NUMERICS_MIN_COSINE, "{r}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The published families llama.cpp runs (`bitnet` for the 1bitLLM models,
/// `llama` for Llama3-8B-1.58 and Falcon3), as `bitnet synth --family`
/// writes them at a reduced size and `convert --type tq2_0` converts them:
/// bitnet-rs on the HF folder and on the file agrees with llama.cpp on the
/// file.
#[test]
fn published_families_agree_with_llama_cpp() {
    use bitnet_frontends::convert::{convert, ConvertOptions};
    use bitnet_frontends::family;
    use bitnet_frontends::model::Model;
    use bitnet_frontends::synth::{write_family, FamilyFormat};
    use bitnet_ir::DType;
    let dir = std::env::temp_dir().join(format!("bitnet-crossval-families-{}", std::process::id()));
    for name in ["bitnet-large", "llama3-8b-1.58", "falcon3-1b", "falcon3-3b"] {
        let f = family::by_name(name).unwrap();
        let folder = dir.join(name);
        write_family(f, false, FamilyFormat::Hf, 5, &folder, |_, _| {}).unwrap();
        let gguf = dir.join(format!("{name}-tq2_0.gguf"));
        convert(&Model::open(&folder).unwrap(), &ConvertOptions { weight_type: DType::TQ2_0, head_type: None }, &gguf, |_, _| {}).unwrap();
        let case = Case { name: name.into(), path: gguf.clone(), llama_path: gguf, tokens: vec![300, 20, 400, 77, 5, 260, 150, 33, 501, 64] };
        let r = check(&case, 2).unwrap();
        eprintln!("{name}: model numerics {} | same math {}", r.model, r.same_math);
        assert!(r.passed(), "{name}: {} | {}", r.model, r.same_math);
        let ours = bitnet_logits(&folder, &case.tokens, ActivationMode::Model, None, 2).unwrap();
        let theirs = Llama::load(&case.llama_path, 2).unwrap().logits(&case.tokens).unwrap();
        let r = compare(&ours, &theirs, f.tiny.vocab).unwrap();
        assert!(r.min_cosine >= MODEL_NUMERICS_MIN_COSINE, "{name}: the folder against llama.cpp: {r}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bitnet perplexity` against llama-perplexity's definition on llama.cpp's
/// logits, same file, same text, compared as mean negative log-likelihood
/// (ln of the perplexity): the trained model (f32, the same math) and a
/// synthetic ternary one (TQ2_0; random weights, so a huge perplexity;
/// llama.cpp's Q8_K activations against bitnet-rs's per-token int8, so a
/// looser bound).
#[test]
fn perplexity_agrees_with_llama_cpp() {
    let text = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/text/stories.txt")).unwrap();
    let tq2 = tiny_cases().iter().find(|c| c.path == c.llama_path && c.path.to_string_lossy().contains("tq2_0")).expect("a TQ2_0 case");
    for (path, ctx, nats) in [(stories(), 128, 1e-4), (tq2.path.clone(), 64, 0.05)] {
        let (tokens, bos, ours) = bitnet_perplexity(&path, &text, ctx, 2).unwrap();
        let theirs = llama_perplexity(&Llama::load(&path, 2).unwrap(), &tokens, ctx, bos).unwrap();
        let (a, b) = (ours.ln(), theirs.ln());
        eprintln!("{}: mean NLL {a:.5} (bitnet-rs) vs {b:.5} (llama.cpp's logits) nats, ctx {ctx}", path.display());
        assert!((a - b).abs() < nats, "{}: perplexity {ours} vs {theirs}", path.display());
    }
}
