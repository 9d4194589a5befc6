//! How good a model (or a lossy way of running it) is on a text:
//! perplexity as llama.cpp's `llama-perplexity` defines it, and the KL
//! divergence of one run's token distributions from a saved base run's.
//!
//! The text's tokens (with BOS, as the vocabulary asks) are cut into
//! non-overlapping windows of `ctx` tokens, the first token of each set to
//! BOS; in each window the logits at positions `ctx/2 … ctx−2` score the
//! token that follows them, so `ctx/2 − 1` tokens a window, each seeing at
//! least half a context before it.

use crate::engine::Engine;
use crate::error::RuntimeError;
use crate::sampler::SamplerConfig;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Windows and steps.
#[derive(Clone, Debug)]
pub struct PerplexityOptions {
    /// Tokens a window.
    pub ctx: usize,
    /// Tokens evaluated a step within a window.
    pub batch: usize,
}

/// What to do with the token distributions: nothing, save them as the base
/// of a later comparison, or compare them with a saved base.
#[derive(Clone, Debug)]
pub enum KlDivergence {
    Off,
    SaveBase(PathBuf),
    CompareWith(PathBuf),
}

#[derive(Clone, Debug, PartialEq)]
pub struct PerplexityReport {
    pub ppl: f64,
    /// One standard error of `ppl` (from the spread of the tokens'
    /// negative log-likelihoods, as llama-perplexity reports it).
    pub ppl_stderr: f64,
    pub windows: usize,
    pub scored_tokens: usize,
    /// Against a saved base, when asked.
    pub kl: Option<KlReport>,
}

/// How this run's distributions differ from the base run's, over the same
/// scored positions.
#[derive(Clone, Debug, PartialEq)]
pub struct KlReport {
    /// The base run's perplexity on the same tokens.
    pub base_ppl: f64,
    /// Mean of KL(base ‖ this), in nats, and its standard error.
    pub mean: f64,
    pub mean_stderr: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
    /// Positions where both runs' most likely token is the same.
    pub top1_agreement: f64,
    /// Of the scored token's probability, this run's minus the base's:
    /// the root mean square and percentiles (1, 5, 10, 25, 50, 75, 90, 95, 99).
    pub dp_rms: f64,
    pub dp_percentiles: Vec<(f64, f64)>,
}

/// Progress after each window.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub windows_done: usize,
    pub windows: usize,
    /// Perplexity over the windows done so far.
    pub ppl: f64,
}

const PERCENTILES: [f64; 9] = [1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0];

/// Perplexity of `engine`'s model over `tokens` (the whole text, BOS
/// first where the vocabulary adds one), optionally saving or comparing
/// the distributions; `progress` hears each window.
pub fn perplexity(
    engine: &Engine,
    tokens: &[u32],
    opts: &PerplexityOptions,
    kl: &KlDivergence,
    mut progress: impl FnMut(Progress),
) -> Result<PerplexityReport, RuntimeError> {
    let (ctx, vocab) = (opts.ctx, engine.vocab());
    if ctx < 4 {
        return RuntimeError::input(format!("a context of {ctx} tokens scores none: use at least 4"));
    }
    if ctx > engine.context {
        return RuntimeError::input(format!("windows of {ctx} tokens do not fit the engine's context of {}", engine.context));
    }
    if opts.batch == 0 {
        return RuntimeError::input("--batch must be at least 1");
    }
    if tokens.len() < 2 * ctx {
        return RuntimeError::input(format!(
            "the text is {} tokens; perplexity with a context of {ctx} needs at least {} (two windows)",
            tokens.len(),
            2 * ctx
        ));
    }
    let windows = tokens.len() / ctx;
    let used = &tokens[..windows * ctx];
    let bos = engine.tokenizer.bos.filter(|_| engine.tokenizer.add_bos);
    let mut base = match kl {
        KlDivergence::Off => Base::None,
        KlDivergence::SaveBase(path) => Base::Save(BaseWriter::create(path, ctx, vocab, used)?),
        KlDivergence::CompareWith(path) => Base::Compare(BaseReader::open(path, ctx, vocab, used)?, KlStats::default()),
    };
    let mut nll = Moments::default();
    let mut logp = vec![0f64; vocab];
    let mut rounded = vec![0f64; vocab];
    let mut seq = engine.new_sequence(SamplerConfig::greedy())?;
    let first = ctx / 2;
    for w in 0..windows {
        let mut window = used[w * ctx..(w + 1) * ctx].to_vec();
        if let Some(b) = bos {
            window[0] = b;
        }
        seq.clear();
        // The first half only fills the cache: no logits but the last.
        let mut at = 0;
        while at < ctx - 1 {
            let scoring = at >= first;
            let end = (at + opts.batch).min(if scoring { ctx - 1 } else { first });
            seq.keep_all_logits = scoring;
            seq.feed(&window[at..end]);
            engine.step_one(&mut seq)?;
            if !scoring {
                at = end;
                continue;
            }
            for (r, row) in seq.logits().chunks_exact(vocab).enumerate() {
                let pos = at + r;
                log_softmax(row, &mut logp);
                let next = window[pos + 1] as usize;
                nll.add(-logp[next]);
                match &mut base {
                    Base::None => {}
                    Base::Save(out) => out.write_row(&logp)?,
                    Base::Compare(input, stats) => {
                        // Rounded as the base's were, so that equal runs differ by nothing.
                        rounded.iter_mut().zip(&logp).for_each(|(r, &v)| *r = v as f32 as f64);
                        stats.add(input.read_row()?, &rounded, next)
                    }
                }
            }
            at = end;
        }
        progress(Progress { windows_done: w + 1, windows, ppl: nll.mean().exp() });
    }
    let ppl = nll.mean().exp();
    let kl = match base {
        Base::None => None,
        Base::Save(out) => {
            out.finish()?;
            None
        }
        Base::Compare(_, stats) => Some(stats.report()),
    };
    Ok(PerplexityReport { ppl, ppl_stderr: ppl * nll.stderr(), windows, scored_tokens: nll.n, kl })
}

/// `out[i] = ln softmax(logits)[i]`, in f64.
pub fn log_softmax(logits: &[f32], out: &mut [f64]) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    for (o, &v) in out.iter_mut().zip(logits) {
        *o = v as f64 - log_sum;
    }
}

/// Count, mean and spread of a stream of values.
#[derive(Default)]
struct Moments {
    n: usize,
    sum: f64,
    sum2: f64,
}

impl Moments {
    fn add(&mut self, v: f64) {
        self.n += 1;
        self.sum += v;
        self.sum2 += v * v;
    }

    fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum / self.n as f64
        }
    }

    /// Standard error of the mean.
    fn stderr(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let mean = self.mean();
        let var = (self.sum2 / self.n as f64 - mean * mean).max(0.0);
        (var / (self.n - 1) as f64).sqrt()
    }
}

enum Base {
    None,
    Save(BaseWriter),
    Compare(BaseReader, KlStats),
}

#[derive(Default)]
struct KlStats {
    kl: Moments,
    kls: Vec<f64>,
    base_nll: Moments,
    same_top1: usize,
    dps: Vec<f64>,
}

impl KlStats {
    fn add(&mut self, base: &[f64], this: &[f64], next: usize) {
        let kl: f64 = base.iter().zip(this).map(|(&p, &q)| if p == f64::NEG_INFINITY { 0.0 } else { p.exp() * (p - q) }).sum();
        // Rounding can make a tiny divergence negative.
        let kl = kl.max(0.0);
        self.kl.add(kl);
        self.kls.push(kl);
        self.base_nll.add(-base[next]);
        self.same_top1 += usize::from(argmax(base) == argmax(this));
        self.dps.push(this[next].exp() - base[next].exp());
    }

    fn report(mut self) -> KlReport {
        self.kls.sort_by(f64::total_cmp);
        self.dps.sort_by(f64::total_cmp);
        let n = self.kls.len().max(1);
        KlReport {
            base_ppl: self.base_nll.mean().exp(),
            mean: self.kl.mean(),
            mean_stderr: self.kl.stderr(),
            median: percentile(&self.kls, 50.0),
            p99: percentile(&self.kls, 99.0),
            max: self.kls.last().copied().unwrap_or(0.0),
            top1_agreement: self.same_top1 as f64 / n as f64,
            dp_rms: (self.dps.iter().map(|d| d * d).sum::<f64>() / n as f64).sqrt(),
            dp_percentiles: PERCENTILES.iter().map(|&p| (p, percentile(&self.dps, p))).collect(),
        }
    }
}

fn argmax(v: &[f64]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

/// The `p`-th percentile of sorted values (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The base file: `BNKLBASE`, a version, the window size, the vocabulary
/// size and the token count (u32 little-endian each), the tokens, then
/// each scored position's log-probabilities over the vocabulary (f32), in
/// window and position order.
const MAGIC: &[u8; 8] = b"BNKLBASE";
const VERSION: u32 = 1;

struct BaseWriter {
    out: BufWriter<File>,
    path: PathBuf,
    row: Vec<u8>,
}

impl BaseWriter {
    fn create(path: &Path, ctx: usize, vocab: usize, tokens: &[u32]) -> Result<BaseWriter, RuntimeError> {
        let file = File::create(path).map_err(|e| io_error(path, e))?;
        let mut w = BaseWriter { out: BufWriter::new(file), path: path.to_owned(), row: Vec::with_capacity(4 * vocab) };
        let mut head = MAGIC.to_vec();
        for v in [VERSION, ctx as u32, vocab as u32, tokens.len() as u32].into_iter().chain(tokens.iter().copied()) {
            head.extend_from_slice(&v.to_le_bytes());
        }
        w.out.write_all(&head).map_err(|e| io_error(path, e))?;
        Ok(w)
    }

    fn write_row(&mut self, logp: &[f64]) -> Result<(), RuntimeError> {
        self.row.clear();
        self.row.extend(logp.iter().flat_map(|&v| (v as f32).to_le_bytes()));
        self.out.write_all(&self.row).map_err(|e| io_error(&self.path, e))
    }

    fn finish(mut self) -> Result<(), RuntimeError> {
        self.out.flush().map_err(|e| io_error(&self.path, e))
    }
}

struct BaseReader {
    input: BufReader<File>,
    path: PathBuf,
    row: Vec<u8>,
    values: Vec<f64>,
}

impl BaseReader {
    fn open(path: &Path, ctx: usize, vocab: usize, tokens: &[u32]) -> Result<BaseReader, RuntimeError> {
        let file = File::open(path).map_err(|e| io_error(path, e))?;
        let mut r = BaseReader { input: BufReader::new(file), path: path.to_owned(), row: vec![0; 4 * vocab], values: vec![0.0; vocab] };
        let not_base = || RuntimeError::Input(format!("{}: not a base file from --kl-divergence-base", path.display()));
        let mut magic = [0u8; 8];
        r.input.read_exact(&mut magic).map_err(|_| not_base())?;
        if &magic != MAGIC {
            return Err(not_base());
        }
        let [version, base_ctx, base_vocab, n] = [(); 4].map(|()| r.u32());
        let (version, base_ctx, base_vocab, n) = (version?, base_ctx? as usize, base_vocab? as usize, n? as usize);
        if version != VERSION {
            return RuntimeError::input(format!("{}: base file version {version}, this bitnet reads {VERSION}", path.display()));
        }
        if (base_ctx, base_vocab) != (ctx, vocab) {
            return RuntimeError::input(format!(
                "{}: the base was saved with a context of {base_ctx} and a vocabulary of {base_vocab}; this run has {ctx} and {vocab}",
                path.display()
            ));
        }
        if n != tokens.len() {
            return RuntimeError::input(format!("{}: the base scored {n} tokens of text, this run {}: not the same text", path.display(), tokens.len()));
        }
        for (i, &t) in tokens.iter().enumerate() {
            let b = r.u32()?;
            if b != t {
                return RuntimeError::input(format!("{}: token {i} is {b} in the base and {t} here: not the same text or tokenizer", path.display()));
            }
        }
        Ok(r)
    }

    fn u32(&mut self) -> Result<u32, RuntimeError> {
        let mut b = [0u8; 4];
        self.input.read_exact(&mut b).map_err(|e| io_error(&self.path, e))?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_row(&mut self) -> Result<&[f64], RuntimeError> {
        self.input.read_exact(&mut self.row).map_err(|e| io_error(&self.path, e))?;
        for (v, b) in self.values.iter_mut().zip(self.row.chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64;
        }
        Ok(&self.values)
    }
}

fn io_error(path: &Path, e: std::io::Error) -> RuntimeError {
    let what = if e.kind() == std::io::ErrorKind::UnexpectedEof { "ends early (a base file cut short?)".to_string() } else { e.to_string() };
    RuntimeError::Input(format!("{}: {what}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_give_the_standard_error_of_the_mean() {
        let mut m = Moments::default();
        for v in [1.0, 2.0, 3.0, 4.0] {
            m.add(v);
        }
        assert_eq!(m.mean(), 2.5);
        // Sample standard deviation sqrt(5/3), over sqrt(4).
        assert!((m.stderr() - (1.25f64 / 3.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn log_softmax_sums_to_one_and_survives_large_logits() {
        let mut out = [0f64; 3];
        log_softmax(&[1000.0, 1000.0, 999.0], &mut out);
        let total: f64 = out.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!((out[0] - out[2] - 1.0).abs() < 1e-9);
    }

    #[test]
    fn kl_is_zero_for_equal_distributions_and_positive_otherwise() {
        let mut p = [0f64; 3];
        let mut q = [0f64; 3];
        log_softmax(&[2.0, 1.0, 0.0], &mut p);
        log_softmax(&[0.0, 1.0, 2.0], &mut q);
        let mut same = KlStats::default();
        same.add(&p, &p, 1);
        let r = same.report();
        assert_eq!((r.mean, r.top1_agreement, r.dp_rms), (0.0, 1.0, 0.0));
        let mut other = KlStats::default();
        other.add(&p, &q, 0);
        let r = other.report();
        let expected: f64 = (0..3).map(|i| p[i].exp() * (p[i] - q[i])).sum();
        assert!((r.mean - expected).abs() < 1e-12 && r.mean > 0.5);
        assert_eq!(r.top1_agreement, 0.0);
        assert!((r.dp_percentiles[4].1 - (q[0].exp() - p[0].exp())).abs() < 1e-12);
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 5.0);
        assert_eq!(percentile(&v, 99.0), 10.0);
        assert_eq!(percentile(&v, 1.0), 1.0);
    }
}
