//! bitnet-crossval: checks bitnet-rs against llama.cpp, a peer no one here
//! wrote, linked through the published `llama-cpp-2` crate (which vendors
//! and builds llama.cpp).
//!
//! Two kinds of evidence:
//! - [`compare`]: teacher-forced logits of the same GGUF at every position
//!   (cosine, max |Δ|, top-1 and top-5 agreement). BitNet quantizes
//!   activations per token; llama.cpp quantizes them per 256 values (`Q8_K`)
//!   for TQ weights and rounds them to f16 for f16 weights. So each model is
//!   compared twice: with bitnet-rs's own numerics (loose threshold) and
//!   with its interpreter set to llama.cpp's activation handling
//!   ([`ActivationMode::LlamaCpp`], tight threshold).
//! - [`bench`]: prefill and decode tokens/s of both engines on one file,
//!   with the same thread count, runs alternating.
//!
//! The comparison itself needs no model: two sets of logits, row by row.
//!
//! ```
//! // Two positions of a four-token vocabulary; the second engine is a
//! // little off at the second position but picks the same token.
//! let ours = [0.1, 2.0, -1.0, 0.5, /* position 2 */ 3.0, 0.0, 1.0, -2.0];
//! let peer = [0.1, 2.0, -1.0, 0.5, /* position 2 */ 2.9, 0.1, 1.0, -2.0];
//! let a = bitnet_crossval::compare(&ours, &peer, 4).unwrap();
//! assert_eq!((a.positions, a.top1_agree), (2, 2));
//! assert!(a.min_cosine > 0.99 && a.min_cosine < 1.0);
//! assert!((a.max_abs_diff - 0.1).abs() < 1e-6);
//! // Shapes that do not match are an error, not a wrong answer.
//! assert!(bitnet_crossval::compare(&ours, &peer[..4], 4).is_err());
//! // Speeds are quoted as medians of alternated runs.
//! assert_eq!(bitnet_crossval::median(vec![3.0, 1.0, 2.0, 10.0]), 2.5);
//! ```

// Every unsafe block states what it relies on (clippy enforces it).
#![deny(clippy::undocumented_unsafe_blocks)]

use anyhow::{anyhow, bail, Context};
use bitnet_frontends::arch::{ActivationMode, GraphOptions, Logits};
use bitnet_frontends::model::Model;
use bitnet_ir::interp::{Interpreter, KvCache, Tensor};
use bitnet_ir::RopeMode;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

/// The llama.cpp this crate links: the vendoring crate's version.
pub const LLAMA_CPP: &str = "llama.cpp vendored by llama-cpp-sys-2 0.1.160 (ggml 0.26.0; the crate tarball carries no llama.cpp build number)";

fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        let mut b = LlamaBackend::init().expect("llama.cpp backend");
        b.void_logs();
        b
    })
}

/// llama.cpp's own description of the CPU features it was built with.
pub fn llama_system_info() -> String {
    backend();
    // SAFETY: returns a pointer to a static, NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) }.to_string_lossy().into_owned()
}

/// A GGUF loaded in llama.cpp (CPU only).
pub struct Llama {
    model: LlamaModel,
    threads: i32,
}

impl Llama {
    pub fn load(path: &Path, threads: usize) -> anyhow::Result<Llama> {
        let params = LlamaModelParams::default().with_n_gpu_layers(0);
        let model = LlamaModel::load_from_file(backend(), path, &params)
            .map_err(|e| anyhow!("llama.cpp could not load {}: {e} (its log is silenced; run llama.cpp itself for the reason)", path.display()))?;
        Ok(Llama { model, threads: threads as i32 })
    }

    pub fn n_vocab(&self) -> usize {
        self.model.n_vocab() as usize
    }

    fn context(&self, n_ctx: usize) -> anyhow::Result<llama_cpp_2::context::LlamaContext<'_>> {
        self.context_seqs(n_ctx, 1)
    }

    /// A context for `n_seq` sequences of `n_ctx / n_seq` positions each.
    fn context_seqs(&self, n_ctx: usize, n_seq: usize) -> anyhow::Result<llama_cpp_2::context::LlamaContext<'_>> {
        // f32 KV cache and no flash attention: the closest llama.cpp gets
        // to plain f32 attention.
        let params = LlamaContextParams::default()
            .with_n_seq_max(n_seq as u32)
            .with_n_ctx(NonZeroU32::new(n_ctx.max(16) as u32))
            .with_n_batch(n_ctx.max(16) as u32)
            .with_n_ubatch(n_ctx.max(16) as u32)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads)
            .with_type_k(KvCacheType::F32)
            .with_type_v(KvCacheType::F32)
            .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED);
        self.model.new_context(backend(), params).context("creating a llama.cpp context")
    }

    /// Logits at every position of `tokens`, evaluated in one batch.
    pub fn logits(&self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        let mut ctx = self.context(tokens.len())?;
        let mut batch = LlamaBatch::new(tokens.len(), 1);
        for (i, &t) in tokens.iter().enumerate() {
            batch.add(LlamaToken(t as i32), i as i32, &[0], true)?;
        }
        ctx.decode(&mut batch)?;
        let mut out = Vec::with_capacity(tokens.len() * self.n_vocab());
        for i in 0..tokens.len() {
            out.extend_from_slice(ctx.get_logits_ith(i as i32));
        }
        Ok(out)
    }

    /// Greedy continuation of `prompt` (the first largest logit wins ties).
    pub fn greedy(&self, prompt: &[u32], n: usize) -> anyhow::Result<Vec<u32>> {
        let mut ctx = self.context(prompt.len() + n)?;
        let mut batch = LlamaBatch::new(prompt.len().max(1), 1);
        for (i, &t) in prompt.iter().enumerate() {
            batch.add(LlamaToken(t as i32), i as i32, &[0], i + 1 == prompt.len())?;
        }
        ctx.decode(&mut batch)?;
        let mut out = Vec::new();
        let mut row = prompt.len() as i32 - 1;
        for pos in prompt.len()..prompt.len() + n {
            let next = bitnet_runtime::sampler::argmax(ctx.get_logits_ith(row));
            out.push(next);
            if out.len() == n {
                break;
            }
            batch.clear();
            batch.add(LlamaToken(next as i32), pos as i32, &[0], true)?;
            ctx.decode(&mut batch)?;
            row = 0;
        }
        Ok(out)
    }

    /// Times a prefill of `n_prompt` tokens (last logits only) and a decode
    /// of `n_gen` tokens, in tokens/s.
    pub fn bench(&self, n_prompt: usize, n_gen: usize) -> anyhow::Result<Speed> {
        let mut ctx = self.context(n_prompt + n_gen)?;
        let tokens = bench_tokens(n_prompt, self.n_vocab());
        let mut batch = LlamaBatch::new(n_prompt.max(1), 1);
        for (i, &t) in tokens.iter().enumerate() {
            batch.add(LlamaToken(t as i32), i as i32, &[0], i + 1 == n_prompt)?;
        }
        let t0 = Instant::now();
        ctx.decode(&mut batch)?;
        let prefill = t0.elapsed().as_secs_f64();
        let mut next = bitnet_runtime::sampler::argmax(ctx.get_logits_ith(n_prompt as i32 - 1));
        let t1 = Instant::now();
        for pos in n_prompt..n_prompt + n_gen {
            batch.clear();
            batch.add(LlamaToken(next as i32), pos as i32, &[0], true)?;
            ctx.decode(&mut batch)?;
            next = bitnet_runtime::sampler::argmax(ctx.get_logits_ith(0));
        }
        Ok(Speed { prefill_tok_s: n_prompt as f64 / prefill, decode_tok_s: n_gen as f64 / t1.elapsed().as_secs_f64() })
    }

    /// `n` sequences in one context: each prefills its own prompt of
    /// `n_prompt` tokens (all in one batch), then `n_gen` steps decode one
    /// token of every sequence in one `llama_batch`. Tokens per second of
    /// the decode, all sequences together (llama-batched-bench's S_TG).
    pub fn bench_parallel(&self, n_prompt: usize, n_gen: usize, n: usize) -> anyhow::Result<f64> {
        let (n_prompt, n) = (n_prompt.max(1), n.max(1));
        let mut ctx = self.context_seqs((n_prompt + n_gen + 1) * n, n)?;
        let tokens = bench_tokens(n_prompt + 1, self.n_vocab());
        let mut batch = LlamaBatch::new(n_prompt * n, 1);
        for s in 0..n {
            let mut t = tokens.clone();
            let len = t.len();
            t.rotate_left(s % len);
            for (i, &tok) in t[..n_prompt].iter().enumerate() {
                batch.add(LlamaToken(tok as i32), i as i32, &[s as i32], i + 1 == n_prompt)?;
            }
        }
        ctx.decode(&mut batch)?;
        let argmax = bitnet_runtime::sampler::argmax;
        let mut next: Vec<u32> = (0..n).map(|s| argmax(ctx.get_logits_ith((s * n_prompt + n_prompt - 1) as i32))).collect();
        let t1 = Instant::now();
        for pos in n_prompt..n_prompt + n_gen {
            batch.clear();
            for (s, &tok) in next.iter().enumerate() {
                batch.add(LlamaToken(tok as i32), pos as i32, &[s as i32], true)?;
            }
            ctx.decode(&mut batch)?;
            for (s, t) in next.iter_mut().enumerate() {
                *t = argmax(ctx.get_logits_ith(s as i32));
            }
        }
        Ok((n * n_gen) as f64 / t1.elapsed().as_secs_f64())
    }
}

/// Deterministic token ids for benchmarks (not BOS-dependent).
fn bench_tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab.min(30000)) as u32).collect()
}

/// bitnet-rs's logits at every position, from its reference interpreter.
pub fn bitnet_logits(path: &Path, tokens: &[u32], activations: ActivationMode, rope_mode: Option<RopeMode>, threads: usize) -> anyhow::Result<Vec<f32>> {
    let model = Model::open(path)?;
    let g = model.graph_with(&GraphOptions { logits: Logits::All, activations, rope_mode })?;
    let ids = Tensor::ids(tokens.iter().map(|&t| t as i32).collect());
    let pos = Tensor::ids((0..tokens.len() as i32).collect());
    let mut out = Interpreter::new(&model, threads).eval(&g, &[("tokens", ids), ("positions", pos)], &mut KvCache::new())?;
    match out.pop() {
        Some(Tensor::F32 { data, .. }) => Ok(data),
        _ => bail!("no logits"),
    }
}

/// Perplexity as llama-perplexity defines it (windows of `ctx` tokens,
/// the first set to `bos`, positions ctx/2 .. ctx-2 scoring the token
/// after them), computed from llama.cpp's logits of each window.
pub fn llama_perplexity(llama: &Llama, tokens: &[u32], ctx: usize, bos: Option<u32>) -> anyhow::Result<f64> {
    let vocab = llama.n_vocab();
    let (mut nll, mut n) = (0f64, 0usize);
    let mut logp = vec![0f64; vocab];
    for window in tokens.chunks_exact(ctx) {
        let mut w = window.to_vec();
        if let Some(b) = bos {
            w[0] = b;
        }
        let logits = llama.logits(&w)?;
        for pos in ctx / 2..ctx - 1 {
            bitnet_runtime::quality::log_softmax(&logits[pos * vocab..(pos + 1) * vocab], &mut logp);
            nll -= logp[w[pos + 1] as usize];
            n += 1;
        }
    }
    if n == 0 {
        bail!("{} tokens make no window of {ctx}", tokens.len());
    }
    Ok((nll / n as f64).exp())
}

/// `bitnet perplexity` on `path` (its compiled CPU backend): the text's
/// tokens (BOS first where the vocabulary adds one), the BOS the windows
/// start with, and the perplexity.
pub fn bitnet_perplexity(path: &Path, text: &str, ctx: usize, threads: usize) -> anyhow::Result<(Vec<u32>, Option<u32>, f64)> {
    use bitnet_runtime::quality::{perplexity, KlDivergence, PerplexityOptions};
    use bitnet_runtime::{Engine, EngineOptions, LoadOptions};
    let load = LoadOptions { threads, context: Some(ctx), ..Default::default() };
    let engine = Engine::open(path, &EngineOptions { load, ..Default::default() })?;
    let tok = &engine.tokenizer;
    let tokens = tok.encode(text, tok.add_bos, false)?;
    let r = perplexity(&engine, &tokens, &PerplexityOptions { ctx, batch: ctx }, &KlDivergence::Off, |_| {})?;
    Ok((tokens, tok.bos.filter(|_| tok.add_bos), r.ppl))
}

/// bitnet-rs prefill and decode speed through its runtime.
pub fn bitnet_bench(path: &Path, n_prompt: usize, n_gen: usize, threads: usize) -> anyhow::Result<Speed> {
    use bitnet_runtime::{GenerateOptions, LoadOptions, SamplerConfig, Session};
    let mut s = Session::load(path, &LoadOptions { threads, context: Some(n_prompt + n_gen + 1), ..Default::default() })?;
    let tokens = bench_tokens(n_prompt, s.vocab());
    let opts = GenerateOptions { n_predict: n_gen + 1, ignore_eos: true, sampler: SamplerConfig::greedy(), dump_logits: false };
    let g = s.generate(&tokens, &opts, |_| {})?;
    Ok(Speed { prefill_tok_s: g.prefill_tok_s(), decode_tok_s: g.decode_tok_s() })
}

/// bitnet-rs's decode of `n` sequences at once (`bitnet bench
/// --parallel`): tokens per second, all sequences together.
pub fn bitnet_bench_parallel(path: &Path, n_prompt: usize, n_gen: usize, threads: usize, n: usize) -> anyhow::Result<f64> {
    use bitnet_runtime::{Engine, EngineOptions, LoadOptions};
    let load = LoadOptions { threads, context: Some(n_prompt + n_gen + 1), ..Default::default() };
    let engine = Engine::open(path, &EngineOptions { load, parallel: n, ..Default::default() })?;
    // No warmup: `Llama::bench_parallel` has none either.
    let plan = bitnet_runtime::bench::Plan { n_prompt, n_gen, reps: 1, warmup: false };
    Ok(bitnet_runtime::bench::bench_parallel(&engine, plan, n)?.0)
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Speed {
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// How two sets of logits agree, position by position.
#[derive(Clone, Debug)]
pub struct Agreement {
    pub positions: usize,
    pub min_cosine: f64,
    pub max_abs_diff: f32,
    pub top1_agree: usize,
    /// Mean overlap of the two top-5 sets, in [0, 1].
    pub top5_overlap: f64,
}

impl std::fmt::Display for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "min cosine {:.6}, max abs diff {:.4}, top-1 {}/{}, top-5 overlap {:.2}",
            self.min_cosine, self.max_abs_diff, self.top1_agree, self.positions, self.top5_overlap
        )
    }
}

/// The five largest entries of a row, best first (ties by index).
fn top5(row: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(5);
    idx
}

/// How logits `a` and `b` (`positions × vocab`, row-major) agree: the
/// lowest cosine over positions, the largest absolute difference, top-1
/// agreement and the mean top-5 overlap. An error when the shapes differ.
pub fn compare(a: &[f32], b: &[f32], vocab: usize) -> anyhow::Result<Agreement> {
    if a.len() != b.len() || vocab == 0 || !a.len().is_multiple_of(vocab) {
        bail!("logit shapes differ: {} vs {} values (vocab {vocab})", a.len(), b.len());
    }
    let mut r = Agreement { positions: a.len() / vocab, min_cosine: 1.0, max_abs_diff: 0.0, top1_agree: 0, top5_overlap: 0.0 };
    for (x, y) in a.chunks(vocab).zip(b.chunks(vocab)) {
        let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
        let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        let ny: f64 = y.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        r.min_cosine = r.min_cosine.min(dot / (nx * ny));
        r.max_abs_diff = x.iter().zip(y).fold(r.max_abs_diff, |m, (p, q)| m.max((p - q).abs()));
        let (tx, ty) = (top5(x), top5(y));
        r.top1_agree += (tx[0] == ty[0]) as usize;
        r.top5_overlap += tx.iter().filter(|t| ty.contains(t)).count() as f64 / 5.0;
    }
    r.top5_overlap /= r.positions as f64;
    Ok(r)
}

/// Median of a non-empty list.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One model of the cross-check suite.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    /// The file bitnet-rs runs.
    pub path: std::path::PathBuf,
    /// The file llama.cpp runs: the same one, or for I2_S (which upstream
    /// llama.cpp cannot read) the same weights written as TQ2_0.
    pub llama_path: std::path::PathBuf,
    pub tokens: Vec<u32>,
}

/// Thresholds of the checks (minimum cosine at every position).
pub const MODEL_NUMERICS_MIN_COSINE: f64 = 0.995;
pub const SAME_MATH_MIN_COSINE: f64 = 0.9999;

#[derive(Clone, Debug)]
pub struct CaseReport {
    pub case: Case,
    /// bitnet-rs's own numerics (per-token int8 for ternary models).
    pub model: Agreement,
    /// bitnet-rs with llama.cpp's activation handling.
    pub same_math: Agreement,
}

impl CaseReport {
    /// The threshold for bitnet-rs's own numerics: where no activation is
    /// quantized (plain f32 models) the math is the same in both engines.
    pub fn model_threshold(&self) -> f64 {
        if self.case.name.contains("f32") || self.case.name.contains("stories") {
            SAME_MATH_MIN_COSINE
        } else {
            MODEL_NUMERICS_MIN_COSINE
        }
    }
    pub fn passed(&self) -> bool {
        self.model.min_cosine >= self.model_threshold() && self.same_math.min_cosine >= SAME_MATH_MIN_COSINE
    }
}

/// Runs one case: llama.cpp's logits for the case's tokens against
/// bitnet-rs's, once with its own numerics and once with llama.cpp's
/// activation handling ([`CaseReport::passed`] applies the thresholds).
pub fn check(case: &Case, threads: usize) -> anyhow::Result<CaseReport> {
    let llama = Llama::load(&case.llama_path, threads)?;
    let reference = llama.logits(&case.tokens)?;
    let vocab = llama.n_vocab();
    let ours = bitnet_logits(&case.path, &case.tokens, ActivationMode::Model, None, threads)?;
    let same = bitnet_logits(&case.path, &case.tokens, ActivationMode::LlamaCpp, None, threads)?;
    Ok(CaseReport { case: case.clone(), model: compare(&ours, &reference, vocab)?, same_math: compare(&same, &reference, vocab)? })
}

/// Writes the synthetic SiLU models of the suite (arch `bitnet`, the one
/// upstream llama.cpp knows) at `shape` into `dir`.
pub fn synth_cases(dir: &Path, shape: bitnet_frontends::synth::SynthShape, label: &str) -> anyhow::Result<Vec<Case>> {
    use bitnet_frontends::arch::Activation;
    use bitnet_frontends::synth::{self, SynthSpec};
    use bitnet_ir::DType;
    std::fs::create_dir_all(dir)?;
    let write = |t: DType| -> anyhow::Result<std::path::PathBuf> {
        let path = dir.join(format!("{label}-{}-silu.gguf", t.name()));
        if !path.exists() {
            let spec = SynthSpec {
                shape: shape.clone(),
                weight_type: t,
                head_type: DType::F16,
                activation: Activation::Silu,
                seed: 7,
                context: 4096,
                rope_theta: 500000.0,
            };
            synth::write(&spec, None, &path, |_, _| {}).map_err(anyhow::Error::msg)?;
        }
        Ok(path)
    };
    let tq2 = write(DType::TQ2_0)?;
    let model = Model::open(&tq2)?;
    let tok = model.tokenizer()?;
    let tokens = tok.encode("The quick brown fox jumps over the lazy dog.", true, false)?;
    let mut cases = Vec::new();
    for t in [DType::TQ2_0, DType::TQ1_0, DType::F16] {
        let path = write(t)?;
        cases.push(Case { name: format!("{label} {}", t.name()), llama_path: path.clone(), path, tokens: tokens.clone() });
    }
    cases.push(Case { name: format!("{label} i2_s (llama.cpp runs the tq2_0 file)"), path: write(DType::I2S)?, llama_path: tq2, tokens });
    Ok(cases)
}

/// stories260K, the real trained model.
pub fn stories_case(path: &Path) -> Case {
    Case {
        name: "stories260K f32".into(),
        path: path.to_path_buf(),
        llama_path: path.to_path_buf(),
        tokens: vec![1, 403, 407, 261, 378, 432, 383, 286, 261, 376],
    }
}
