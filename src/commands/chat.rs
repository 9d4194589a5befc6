//! `bitnet chat`: an interactive conversation. Each turn renders the whole
//! conversation with the chat template and evaluates only what the KV
//! cache does not already hold.

use super::run::print_timings;
use super::{ModelArgs, SamplingArgs};
use bitnet_frontends::chat::Message;
use bitnet_frontends::tokenizer::TextStream;
use bitnet_runtime::GenerateOptions;
use std::io::{BufRead, Write};

#[derive(clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    pub n_predict: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print timings after each reply.
    #[arg(long)]
    pub verbose: bool,
}

pub fn chat(a: ChatArgs) -> anyhow::Result<()> {
    let mut session = a.model.load()?;
    let sampler = a.sampling.config()?;
    let seed = sampler.seed;
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message::new("system", s));
    }
    eprintln!("chatting with {} (Ctrl-D to leave)", a.model.model.display());
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let tokenizer = session.tokenizer.clone();
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        messages.push(Message::new("user", &line));
        let ids = session.chat_ids(&messages)?;
        // Reuse the cached prefix; evaluate the rest.
        let common = session.sequence().keep_common_prefix(&ids);
        let room = session.context.saturating_sub(ids.len());
        if room == 0 {
            anyhow::bail!("the conversation no longer fits in the context of {} tokens (raise it with -c)", session.context);
        }
        let opts = GenerateOptions { n_predict: a.n_predict.min(room), ignore_eos: false, sampler: sampler.clone(), dump_logits: false };
        let mut stream = TextStream::new(tokenizer.clone(), ids.last().copied());
        let mut out = std::io::stdout().lock();
        let gen = session.generate(&ids[common..], &opts, |id| {
            let _ = write!(out, "{}", stream.push(id));
            let _ = out.flush();
        })?;
        writeln!(out, "{}", stream.finish())?;
        let reply = tokenizer.decode(ids.last().copied(), &gen.generated_ids);
        let reply = reply.trim_end().to_string();
        messages.push(Message::new("assistant", &reply));
        if a.verbose {
            print_timings(&session, &gen, seed);
        }
    }
    eprintln!();
    Ok(())
}
