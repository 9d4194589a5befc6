//! `bitnet run`: one prompt, one generation; or, with a prompts file, many
//! prompts batched together.

use super::{ModelArgs, SamplingArgs};
use anyhow::Context;
use bitnet_frontends::chat::Message;
use bitnet_frontends::tokenizer::TextStream;
use bitnet_runtime::{Engine, GenerateOptions, Generation, Session};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "file", "prompt_ids", "prompt_ids_file"])))]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text.
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// Read the prompt from a file; with --parallel, many prompts, one a
    /// line, generated together (see --prompt-ids-file).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Prompt as token ids, used exactly as given (no BOS added).
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Many prompts as token ids, one comma-separated list a line, used
    /// exactly as given, generated together (up to --parallel at once).
    /// Prints one JSON line per prompt, in the file's order, with `index`
    /// (the line number from 0); prompt i samples with seed + i, and one
    /// that fails gets a line with `index` and `error`.
    #[arg(long, value_name = "FILE")]
    pub prompt_ids_file: Option<PathBuf>,
    /// Sequences generated at once from a prompts file [default: 8].
    #[arg(long)]
    pub parallel: Option<usize>,
    /// Bytes of KV cache for all sequences together [default: --parallel
    /// full contexts].
    #[arg(long)]
    pub kv_budget: Option<usize>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_predict: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Keep generating past end-of-text tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Apply the model's chat template to the prompt (once).
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Print one JSON object (ids, text, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Write the logits of every evaluated position to an .npy file.
    #[arg(long, value_name = "FILE.npy", conflicts_with_all = ["parallel", "prompt_ids_file"])]
    pub dump_logits: Option<PathBuf>,
}

/// A prompt's text as ids: through the chat template with --chat, else
/// encoded with the tokenizer's BOS rule.
fn encode(engine: &Engine, a: &RunArgs, text: &str) -> anyhow::Result<Vec<u32>> {
    if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", text));
        return Ok(engine.chat_ids(&msgs)?);
    }
    let tok = &engine.tokenizer;
    Ok(tok.encode(text, tok.add_bos, false)?)
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    if a.prompt_ids_file.is_some() || (a.file.is_some() && a.parallel.is_some()) {
        return run_batch(a);
    }
    if a.parallel.is_some() {
        anyhow::bail!("--parallel runs many prompts: give them with -f FILE (text, one a line) or --prompt-ids-file FILE");
    }
    let mut session = a.model.load()?;
    let sampler = a.sampling.config()?;
    let seed = sampler.seed;
    let (prompt_ids, echo) = if let Some(ids) = &a.prompt_ids {
        (ids.clone(), session.tokenizer.decode_text(ids))
    } else {
        let text = match (&a.prompt, &a.file) {
            (Some(p), _) => p.clone(),
            (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading prompt file {}", f.display()))?,
            _ => unreachable!("clap requires a prompt"),
        };
        let ids = encode(&session, &a, &text)?;
        (ids, if a.chat { String::new() } else { text })
    };
    if prompt_ids.is_empty() {
        anyhow::bail!("the prompt is empty: nothing to generate from");
    }
    if sampler.format.is_some() {
        // A schema or grammar that does not compile is the error, before any output.
        session.sampler(sampler.clone())?;
    }
    let opts = GenerateOptions { n_predict: a.n_predict, ignore_eos: a.ignore_eos, sampler, dump_logits: a.dump_logits.is_some() };
    let mut stdout = std::io::stdout().lock();
    if !a.json && !echo.is_empty() {
        write!(stdout, "{echo}")?;
        stdout.flush()?;
    }
    let tokenizer = session.tokenizer.clone();
    let mut stream = TextStream::new(tokenizer.clone(), prompt_ids.last().copied());
    let json = a.json;
    let gen = session.generate(&prompt_ids, &opts, |id| {
        if !json {
            let _ = write!(stdout, "{}", stream.push(id));
            let _ = stdout.flush();
        }
    })?;
    let rest = stream.finish();
    if let Some(path) = &a.dump_logits {
        let rows = gen.logits.len() / session.vocab();
        let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        bitnet_runtime::npy::write_f32(std::io::BufWriter::new(f), &[rows, session.vocab()], &gen.logits)?;
    }
    if json {
        let text = session.tokenizer.decode(prompt_ids.last().copied(), &gen.generated_ids);
        let obj = serde_json::json!({
            "prompt_ids": gen.prompt_ids,
            "generated_ids": gen.generated_ids,
            "text": text,
            "load_ms": session.load_ms,
            "prefill_tok_s": gen.prefill_tok_s(),
            "decode_tok_s": gen.decode_tok_s(),
        });
        writeln!(stdout, "{obj}")?;
    } else {
        writeln!(stdout, "{rest}")?;
    }
    print_timings(&session, &gen, seed);
    Ok(())
}

/// `run --prompts-file` / `--prompt-ids-file`: every prompt through one
/// engine, up to --parallel sequences a step; one JSON line per prompt in
/// input order, as soon as it and those before it are done.
fn run_batch(a: RunArgs) -> anyhow::Result<()> {
    let parallel = a.parallel.unwrap_or(8);
    let engine = a.model.open(parallel, a.kv_budget)?;
    let sampler = a.sampling.config()?;
    let (path, ids) = match (&a.prompt_ids_file, &a.file) {
        (Some(p), _) => (p, true),
        (None, Some(p)) => (p, false),
        _ => unreachable!("checked by the caller"),
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        anyhow::bail!("{} holds no prompts", path.display());
    }
    // A line that does not parse fails that prompt only.
    let mut prompts = Vec::with_capacity(lines.len());
    let mut bad: Vec<Option<String>> = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let parsed: anyhow::Result<Vec<u32>> = if ids {
            line.split(',').map(|t| t.trim().parse::<u32>().with_context(|| format!("line {}: {t:?} is not a token id", i + 1))).collect()
        } else {
            encode(&engine, &a, line)
        };
        let mut s = sampler.clone();
        s.seed = s.seed.wrapping_add(i as u64);
        let opts = GenerateOptions { n_predict: a.n_predict, ignore_eos: a.ignore_eos, sampler: s, dump_logits: false };
        match parsed {
            Ok(p) => {
                prompts.push((p, opts));
                bad.push(None);
            }
            Err(e) => {
                prompts.push((Vec::new(), opts));
                bad.push(Some(format!("{e:#}")));
            }
        }
    }
    let t0 = std::time::Instant::now();
    let mut done: Vec<Option<String>> = vec![None; prompts.len()];
    let (mut printed, mut generated, mut failed) = (0, 0usize, 0usize);
    let mut stdout = std::io::stdout().lock();
    let mut result = Ok(());
    engine.generate_batch(&prompts, parallel, |i, r| {
        let line = match (r, &bad[i]) {
            (_, Some(e)) => {
                failed += 1;
                serde_json::json!({ "index": i, "error": e })
            }
            (Err(e), None) => {
                failed += 1;
                serde_json::json!({ "index": i, "error": e.to_string() })
            }
            (Ok(g), None) => {
                generated += g.generated_ids.len();
                serde_json::json!({
                    "index": i,
                    "prompt_ids": g.prompt_ids,
                    "generated_ids": g.generated_ids,
                    "text": engine.tokenizer.decode(g.prompt_ids.last().copied(), &g.generated_ids),
                    "load_ms": engine.load_ms,
                    "prefill_tok_s": g.prefill_tok_s(),
                    "decode_tok_s": g.decode_tok_s(),
                    "stop": g.stop.name(),
                    "cached_tokens": g.cached_tokens,
                })
            }
        };
        done[i] = Some(line.to_string());
        while let Some(Some(l)) = done.get(printed) {
            if result.is_ok() {
                result = writeln!(stdout, "{l}");
            }
            printed += 1;
        }
    });
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "\nload {:.1} ms | {} prompts ({failed} failed), {} at once | generated {generated} tokens in {secs:.2} s, {:.2} tok/s | seeds {}.. | {} threads, {}",
        engine.load_ms,
        prompts.len(),
        parallel,
        generated as f64 / secs.max(1e-9),
        sampler.seed,
        engine.threads,
        engine.backend_kind().name(),
    );
    Ok(())
}

pub fn print_timings(session: &Session, gen: &Generation, seed: u64) {
    eprintln!(
        "\nload {:.1} ms | prompt {} tokens, {:.2} tok/s | generated {} tokens, {:.2} tok/s | stop: {} | seed {seed} | {} threads, {}",
        session.load_ms,
        gen.prompt_ids.len(),
        gen.prefill_tok_s(),
        gen.generated_ids.len(),
        gen.decode_tok_s(),
        gen.stop.name(),
        session.threads,
        session.backend().name(),
    );
}
