//! `bitnet perplexity`: a model's perplexity over a text, and the KL
//! divergence of its distributions from a saved base run (llama.cpp's
//! `llama-perplexity`, `--kl-divergence-base` / `--kl-divergence`).

use super::ModelArgs;
use anyhow::Context;
use bitnet_runtime::quality::{self, KlDivergence, PerplexityOptions, PerplexityReport};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct PerplexityArgs {
    /// The model; -c is the window size [default: 512, or the model's
    /// context if smaller].
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Tokens evaluated a step within a window [default: the window].
    #[arg(short = 'b', long)]
    pub batch: Option<usize>,
    /// Save every scored position's log-probabilities to FILE, as the base
    /// of a later --kl-divergence run; with --kl-divergence, the base to
    /// compare with.
    #[arg(long, value_name = "FILE")]
    pub kl_divergence_base: Option<PathBuf>,
    /// Compare this run's distributions with the base in
    /// --kl-divergence-base (same text, same -c): mean KL divergence, top-1
    /// agreement, and how the scored token's probability moved.
    #[arg(long, requires = "kl_divergence_base")]
    pub kl_divergence: bool,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn perplexity(a: PerplexityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let mut model = a.model.clone();
    model.ctx_size = Some(a.model.ctx_size.unwrap_or(512));
    let engine = model.open(1, None)?;
    let ctx = a.model.ctx_size.unwrap_or(512.min(engine.model.config.context.max(4)));
    let tok = &engine.tokenizer;
    let tokens = tok.encode(&text, tok.add_bos, false)?;
    let kl = match (&a.kl_divergence_base, a.kl_divergence) {
        (None, _) => KlDivergence::Off,
        (Some(path), false) => KlDivergence::SaveBase(path.clone()),
        (Some(path), true) => KlDivergence::CompareWith(path.clone()),
    };
    let opts = PerplexityOptions { ctx, batch: a.batch.unwrap_or(ctx) };
    let windows = tokens.len() / ctx;
    if !a.json {
        eprintln!("{} tokens; {windows} windows of {ctx}, {} tokens scored in each", tokens.len(), (ctx / 2).saturating_sub(1));
    }
    let bar = indicatif::ProgressBar::new(windows as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} windows {elapsed_precise} {msg}").expect("a valid template"));
    let report = quality::perplexity(&engine, &tokens, &opts, &kl, |p| {
        bar.set_position(p.windows_done as u64);
        bar.set_message(format!("perplexity {:.4}", p.ppl));
    });
    bar.finish_and_clear();
    let report = report?;
    if a.json {
        println!("{}", json(&report, ctx));
        return Ok(());
    }
    println!(
        "perplexity: {} ± {} ({} windows of {ctx} tokens, {} tokens scored)",
        num(report.ppl),
        num(report.ppl_stderr),
        report.windows,
        report.scored_tokens
    );
    if let KlDivergence::SaveBase(path) = &kl {
        println!("saved the base distributions to {}", path.display());
    }
    if let Some(k) = &report.kl {
        println!("base perplexity: {} (ln ratio {:+.5})", num(k.base_ppl), (report.ppl / k.base_ppl).ln());
        println!("mean KL divergence: {:.6} ± {:.6} nats (median {:.6}, 99% {:.6}, max {:.6})", k.mean, k.mean_stderr, k.median, k.p99, k.max);
        println!("top-1 agreement: {:.2}%", 100.0 * k.top1_agreement);
        let pct: Vec<String> = k.dp_percentiles.iter().map(|(p, v)| format!("{p}%: {:+.3}%", 100.0 * v)).collect();
        println!("scored token's probability, this run minus base: RMS {:.3}%; {}", 100.0 * k.dp_rms, pct.join(", "));
    }
    Ok(())
}

/// Four decimals, or four significant digits in scientific notation for
/// the huge perplexities of random-weight models.
fn num(v: f64) -> String {
    if v.abs() < 1e6 {
        format!("{v:.4}")
    } else {
        format!("{v:.4e}")
    }
}

fn json(r: &PerplexityReport, ctx: usize) -> serde_json::Value {
    let mut v = serde_json::json!({
        "ppl": r.ppl, "ppl_stderr": r.ppl_stderr, "windows": r.windows, "scored_tokens": r.scored_tokens, "ctx": ctx,
    });
    if let Some(k) = &r.kl {
        let dp: serde_json::Map<String, serde_json::Value> = k.dp_percentiles.iter().map(|(p, v)| (p.to_string(), (*v).into())).collect();
        let kl = serde_json::json!({
            "base_ppl": k.base_ppl, "kl_mean": k.mean, "kl_mean_stderr": k.mean_stderr, "kl_median": k.median, "kl_p99": k.p99,
            "kl_max": k.max, "top1_agreement": k.top1_agreement, "dp_rms": k.dp_rms, "dp_percentiles": dp,
        });
        v.as_object_mut().expect("an object").extend(kl.as_object().expect("an object").clone());
    }
    v
}
