//! `bitnet serve`: the OpenAI-compatible HTTP server.

use super::ModelArgs;
use anyhow::Context;
use bitnet_server::ServerConfig;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences generated at once (continuous batching).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Bytes of KV cache for all sequences together [default: --parallel
    /// full contexts].
    #[arg(long)]
    pub kv_budget: Option<usize>,
    /// Require `Authorization: Bearer KEY` on the API endpoints.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from a file (its first line).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// The model's name in the API [default: the file name].
    #[arg(long)]
    pub alias: Option<String>,
    /// Allow browsers on this origin (or `*`) to call the API.
    #[arg(long)]
    pub cors: Option<String>,
    /// Sequences that may wait for a slot (a request of `n` choices is `n`
    /// of them); more get 503, except that an empty queue takes any request.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Seconds a request may take from admission to its last token.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Prompt tokens fed per step across all sequences, beside the decode
    /// rows (vLLM's --max-num-batched-tokens): smaller gives the streams of
    /// running requests a shorter stall when a long prompt arrives, larger
    /// takes prompts in faster.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub step_tokens: u32,
}

pub fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let api_key = match (&a.api_key, &a.api_key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading the API key file {}", f.display()))?;
            Some(text.lines().next().unwrap_or("").trim().to_string()).filter(|k| !k.is_empty())
        }
        _ => None,
    };
    if a.api_key_file.is_some() && api_key.is_none() {
        anyhow::bail!("the API key file is empty");
    }
    let alias =
        a.alias.clone().unwrap_or_else(|| a.model.model.file_name().map_or_else(|| a.model.model.display().to_string(), |n| n.to_string_lossy().into_owned()));
    let mut config = ServerConfig::new(&alias);
    config.api_key = api_key;
    config.cors = a.cors.clone();
    config.scheduler.parallel = a.parallel;
    config.scheduler.max_queue = a.max_queue;
    config.scheduler.step_tokens = a.step_tokens as usize;
    config.timeout = a.timeout.map(Duration::from_secs);
    let (host, port) = (a.host.clone(), a.port);
    let load = move || {
        let engine = a.model.open(a.parallel, a.kv_budget).map_err(|e| format!("{e:#}"))?;
        eprintln!(
            "loaded {} in {:.0} ms: context {}, {} sequences at once, KV budget {:.1} MiB",
            alias,
            engine.load_ms,
            engine.context,
            a.parallel,
            engine.kv_usage().bytes_total() as f64 / (1 << 20) as f64
        );
        Ok(engine)
    };
    bitnet_server::run_blocking(load, config, &host, port).context("serving")
}
