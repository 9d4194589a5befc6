//! `bitnet run`: one prompt, one generation.

use super::{ModelArgs, SamplingArgs};
use anyhow::Context;
use bitnet_frontends::chat::{self, Message};
use bitnet_frontends::tokenizer::TextStream;
use bitnet_runtime::{GenerateOptions, Generation, Session, StopReason};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "file", "prompt_ids"])))]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text.
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Prompt as token ids, used exactly as given (no BOS added).
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
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
    #[arg(long, value_name = "FILE.npy")]
    pub dump_logits: Option<PathBuf>,
}

/// The ids of a conversation rendered with the model's chat template,
/// special-token text parsed as special tokens.
pub fn chat_ids(session: &Session, messages: &[Message]) -> anyhow::Result<Vec<u32>> {
    let tok = &session.tokenizer;
    let template = tok.chat_template.as_deref().context("this model has no chat template (tokenizer.chat_template)")?;
    let text_of = |id: Option<u32>| id.and_then(|i| tok.piece(i)).unwrap_or("").to_string();
    let (bos, eos) = (text_of(tok.bos), text_of(tok.eos));
    let rendered = chat::render(template, messages, true, &bos, &eos)?;
    let add_bos = tok.add_bos && (bos.is_empty() || !rendered.starts_with(&bos));
    Ok(tok.encode(&rendered, add_bos, true)?)
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
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
        if a.chat {
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(Message::new("system", s));
            }
            msgs.push(Message::new("user", &text));
            (chat_ids(&session, &msgs)?, String::new())
        } else {
            let tok = &session.tokenizer;
            (tok.encode(&text, tok.add_bos, false)?, text)
        }
    };
    if prompt_ids.is_empty() {
        anyhow::bail!("the prompt is empty: nothing to generate from");
    }
    let opts = GenerateOptions { n_predict: a.n_predict, ignore_eos: a.ignore_eos, sampler, dump_logits: a.dump_logits.is_some() };
    let mut stdout = std::io::stdout().lock();
    if !a.json && !echo.is_empty() {
        write!(stdout, "{echo}")?;
        stdout.flush()?;
    }
    let tokenizer = session.tokenizer.clone();
    let mut stream = TextStream::new(&tokenizer, prompt_ids.last().copied());
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

pub fn print_timings(session: &Session, gen: &Generation, seed: u64) {
    let stop = match gen.stop {
        StopReason::Length => "length",
        StopReason::EndOfGeneration => "end of text",
        StopReason::ContextFull => "context full",
    };
    eprintln!(
        "\nload {:.1} ms | prompt {} tokens, {:.2} tok/s | generated {} tokens, {:.2} tok/s | stop: {stop} | seed {seed} | {} threads, {}",
        session.load_ms,
        gen.prompt_ids.len(),
        gen.prefill_tok_s(),
        gen.generated_ids.len(),
        gen.decode_tok_s(),
        session.threads,
        session.backend().name(),
    );
}
