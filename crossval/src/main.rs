//! `crossval`: bitnet-rs against llama.cpp, logits and speed.

use anyhow::Context;
use bitnet_crossval::*;
use bitnet_frontends::synth::SynthShape;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "crossval", about = "Compare bitnet-rs with llama.cpp on the same GGUF files")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Teacher-forced logits of generated models (and stories260K) in both engines.
    Check {
        /// Shapes to synthesize: tiny, 2b4t (repeatable).
        #[arg(long, default_values_t = vec!["tiny".to_string()])]
        shape: Vec<String>,
        /// stories260K's GGUF, to also check a real trained model.
        #[arg(long)]
        stories: Option<PathBuf>,
        /// Where the generated models go.
        #[arg(long, default_value = "target/crossval-models")]
        dir: PathBuf,
        #[arg(short, long, default_value_t = 2)]
        threads: usize,
        /// Compare only the first N positions of the synthetic models' prompt
        /// (the reference interpreter is slow at the 2B4T shape).
        #[arg(long)]
        max_tokens: Option<usize>,
    },
    /// Teacher-forced logits of one GGUF file in both engines.
    Logits {
        #[arg(short, long)]
        model: PathBuf,
        /// The file bitnet-rs runs, if not the same.
        #[arg(long)]
        bitnet_model: Option<PathBuf>,
        /// Token ids [default: the model's tokenization of a fixed sentence].
        #[arg(long, value_delimiter = ',')]
        prompt_ids: Option<Vec<u32>>,
        #[arg(short, long, default_value_t = 2)]
        threads: usize,
    },
    /// Prefill and decode tokens/s of both engines on one file, runs alternating.
    Bench {
        #[arg(short, long)]
        model: PathBuf,
        /// The file bitnet-rs runs, if not the same (e.g. I2_S beside llama.cpp's TQ2_0).
        #[arg(long)]
        bitnet_model: Option<PathBuf>,
        #[arg(short = 'p', long, default_value_t = 128)]
        n_prompt: usize,
        #[arg(short = 'n', long, default_value_t = 64)]
        n_gen: usize,
        #[arg(short, long, default_value_t = 2)]
        threads: usize,
        #[arg(short, long, default_value_t = 3)]
        reps: usize,
        /// Also decode this many sequences at once in each engine (one
        /// llama_batch a step in llama.cpp) and compare the totals.
        #[arg(long)]
        parallel: Option<usize>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    println!("{LLAMA_CPP}\nllama.cpp system info: {}", llama_system_info().trim());
    match cli.command {
        Command::Check { shape, stories, dir, threads, max_tokens } => {
            let mut cases = Vec::new();
            if let Some(s) = stories {
                cases.push(stories_case(&s));
            }
            for s in &shape {
                let sh = match s.as_str() {
                    "tiny" => SynthShape::tiny(),
                    "2b4t" => SynthShape::b2b4t(),
                    other => anyhow::bail!("unknown shape {other}"),
                };
                eprintln!("writing {s} models into {} ...", dir.display());
                let mut more = synth_cases(&dir, sh, s)?;
                if let Some(n) = max_tokens {
                    more.iter_mut().for_each(|c| c.tokens.truncate(n.max(1)));
                }
                cases.extend(more);
            }
            println!("\n| model | positions | bitnet-rs numerics vs llama.cpp | threshold | llama.cpp's activation handling vs llama.cpp | threshold | |");
            println!("|---|---|---|---|---|---|---|");
            let mut ok = true;
            for c in &cases {
                let r = check(c, threads).with_context(|| c.name.clone())?;
                ok &= r.passed();
                println!(
                    "| {} | {} | {} | ≥ {} | {} | ≥ {} | {} |",
                    c.name,
                    r.model.positions,
                    r.model,
                    r.model_threshold(),
                    r.same_math,
                    SAME_MATH_MIN_COSINE,
                    if r.passed() { "ok" } else { "FAIL" }
                );
            }
            println!("\nSynthetic models use SiLU (arch `bitnet`), because upstream llama.cpp's bitnet graph hard-codes SiLU;");
            println!("squared-ReLU models are checked against the test suite's own reference implementation instead (tests/formats.rs).");
            println!("I2_S cannot be read by upstream llama.cpp: bitnet-rs runs the I2_S file, llama.cpp the same weights as TQ2_0.");
            Ok(ok)
        }
        Command::Logits { model, bitnet_model, prompt_ids, threads } => {
            let tokens = match prompt_ids {
                Some(t) => t,
                None => bitnet_frontends::model::Model::open(&model)?.tokenizer()?.encode("The quick brown fox jumps over the lazy dog.", true, false)?,
            };
            let case = Case { name: model.display().to_string(), path: bitnet_model.unwrap_or_else(|| model.clone()), llama_path: model, tokens };
            let r = check(&case, threads)?;
            println!("{}: {} positions", case.name, r.model.positions);
            println!("  bitnet-rs numerics:              {} (threshold {})", r.model, r.model_threshold());
            println!("  llama.cpp's activation handling: {} (threshold {SAME_MATH_MIN_COSINE})", r.same_math);
            Ok(r.passed())
        }
        Command::Bench { model, bitnet_model, n_prompt, n_gen, threads, reps, parallel } => {
            let ours = bitnet_model.unwrap_or_else(|| model.clone());
            let llama = Llama::load(&model, threads)?;
            let (mut lp, mut ld, mut bp, mut bd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for r in 0..reps {
                let l = llama.bench(n_prompt, n_gen)?;
                let b = bitnet_bench(&ours, n_prompt, n_gen, threads)?;
                eprintln!(
                    "run {}/{reps}: llama.cpp {:.2}/{:.2} tok/s, bitnet-rs {:.2}/{:.2} tok/s",
                    r + 1,
                    l.prefill_tok_s,
                    l.decode_tok_s,
                    b.prefill_tok_s,
                    b.decode_tok_s
                );
                lp.push(l.prefill_tok_s);
                ld.push(l.decode_tok_s);
                bp.push(b.prefill_tok_s);
                bd.push(b.decode_tok_s);
            }
            let (lp, ld, bp, bd) = (median(lp), median(ld), median(bp), median(bd));
            println!("\n{} threads, median of {reps} alternating runs", threads);
            println!("| engine | file | prefill pp{n_prompt} tok/s | decode tg{n_gen} tok/s |");
            println!("|---|---|---|---|");
            println!("| llama.cpp | {} | {lp:.2} | {ld:.2} |", model.display());
            println!("| bitnet-rs | {} | {bp:.2} | {bd:.2} |", ours.display());
            println!("| ratio bitnet-rs / llama.cpp | | {:.3} | {:.3} |", bp / lp, bd / ld);
            if let Some(n) = parallel {
                let (mut l, mut b) = (Vec::new(), Vec::new());
                for r in 0..reps {
                    l.push(llama.bench_parallel(n_prompt, n_gen, n)?);
                    b.push(bitnet_bench_parallel(&ours, n_prompt, n_gen, threads, n)?);
                    eprintln!("run {}/{reps}, {n} sequences: llama.cpp {:.2} tok/s, bitnet-rs {:.2} tok/s", r + 1, l[r], b[r]);
                }
                let (l, b) = (median(l), median(b));
                println!(
                    "
{n} sequences decoding together, tokens/s of all of them, median of {reps} alternating runs"
                );
                println!("| engine | aggregate decode tg{n_gen} x{n} | vs its single-sequence decode |");
                println!("|---|---|---|");
                println!("| llama.cpp | {l:.2} | {:.2}x |", l / ld);
                println!("| bitnet-rs | {b:.2} | {:.2}x |", b / bd);
                println!("| ratio bitnet-rs / llama.cpp | {:.3} | |", b / l);
            }
            Ok(true)
        }
    }
}
