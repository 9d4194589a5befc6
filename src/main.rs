//! The `bitnet` command line: argument parsing and printing only; the
//! engine lives in the workspace crates.

mod commands;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "bitnet", version, about = "Run ternary (BitNet b1.58) language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Run(commands::run::RunArgs),
    /// Talk to a model, turn by turn (Ctrl-D to leave).
    Chat(commands::chat::ChatArgs),
    /// Print the token ids of a text.
    Tokenize(commands::inspect::TokenizeArgs),
    /// Show a model file's architecture, tokenizer and tensors.
    Inspect(commands::inspect::InspectArgs),
    /// Write a random-weight BitNet model for tests and benchmarks.
    Synth(commands::synth::SynthArgs),
    /// Lower a model for this machine; --dump-after PASS shows the graph after a pass.
    Compile(commands::compile::CompileArgs),
    /// Measure prefill and decode speed (like llama-bench).
    Bench(commands::bench::BenchArgs),
    /// Measure tile candidates on this machine; compile and run use the winners.
    Autotune(commands::autotune::AutotuneArgs),
    /// Convert a GGUF file or Hugging Face folder to GGUF for bitnet.cpp or llama.cpp.
    Convert(commands::convert::ConvertArgs),
    /// Perplexity over a text, and KL divergence from a saved base run (like llama-perplexity).
    Perplexity(commands::perplexity::PerplexityArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(commands::serve::ServeArgs),
}

fn main() -> ExitCode {
    let start = std::time::Instant::now();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => commands::run::run(a),
        Command::Chat(a) => commands::chat::chat(a),
        Command::Tokenize(a) => commands::inspect::tokenize(a),
        Command::Inspect(a) => commands::inspect::inspect(a),
        Command::Synth(a) => commands::synth::synth(a),
        Command::Convert(a) => commands::convert::convert(a),
        Command::Compile(a) => commands::compile::compile(a),
        Command::Bench(a) => commands::bench::bench(a, start),
        Command::Autotune(a) => commands::autotune::autotune(a),
        Command::Serve(a) => commands::serve::serve(a),
        Command::Perplexity(a) => commands::perplexity::perplexity(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
