pub mod autotune;
pub mod bench;
pub mod chat;
pub mod compile;
pub mod convert;
pub mod inspect;
pub mod run;
pub mod synth;

use anyhow::Context;
use bitnet_codegen::schedule::Pinned;
use bitnet_runtime::{Backend, LoadOptions, SamplerConfig, Session};
use std::path::{Path, PathBuf};

/// Options shared by `run` and `chat`.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// Model: a GGUF file, a Hugging Face folder, or an artifact from `bitnet compile`.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Context size in tokens [default: the model's].
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// Threads [default: all cores].
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// What runs the graph: the compiled native kernels or the reference interpreter.
    #[arg(long, value_enum, default_value_t = BackendArg::Compiled)]
    pub backend: BackendArg,
    /// Output head: as stored, or quantized to int8 per row when loading
    /// (half the bytes of an f16 head; lossy, compiled backend only).
    #[arg(long, value_enum, default_value_t = HeadArg::Stored)]
    pub head: HeadArg,
    /// Use the default tiles, not those `bitnet autotune` measured.
    #[arg(long)]
    pub no_tune: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadArg {
    Stored,
    Q8,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendArg {
    Interp,
    Compiled,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// The target device.
#[derive(clap::Args, Clone)]
pub struct DeviceArgs {
    /// Device to run on.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
}

impl DeviceArgs {
    pub fn runtime(&self) -> bitnet_runtime::Device {
        match self.device {
            Device::Cpu => bitnet_runtime::Device::Cpu,
            Device::Cuda => bitnet_runtime::Device::Cuda,
        }
    }
}

/// `-t`, or every core.
pub fn threads(t: Option<usize>) -> anyhow::Result<usize> {
    match t {
        Some(0) => anyhow::bail!("-t must be at least 1"),
        Some(t) => Ok(t),
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Session> {
        let threads = threads(self.threads)?;
        let backend = match self.backend {
            BackendArg::Interp => Backend::Interp,
            BackendArg::Compiled => Backend::Compiled,
        };
        if self.head == HeadArg::Q8 && backend == Backend::Interp {
            anyhow::bail!("--head q8 is a compile option: it needs --backend compiled");
        }
        let pinned = Pinned { head_q8: self.head == HeadArg::Q8, ..Default::default() };
        load(&self.model, &LoadOptions { threads, context: self.ctx_size, backend, device: self.device.runtime(), pinned, tuning: !self.no_tune })
    }
}

fn load(path: &Path, opts: &LoadOptions) -> anyhow::Result<Session> {
    let session = Session::load(path, opts).with_context(|| format!("loading {}", path.display()))?;
    for w in &session.warnings {
        eprintln!("warning: {w}");
    }
    Ok(session)
}

/// Sampling flags, in llama.cpp's spelling and with its defaults.
#[derive(clap::Args, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temp: f32,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely.
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalize tokens seen in the last --repeat-last-n (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed [default: from the clock].
    #[arg(short = 's', long)]
    pub seed: Option<u64>,
    /// Always take the most likely token (same as --temp 0).
    #[arg(long)]
    pub greedy: bool,
}

impl SamplingArgs {
    pub fn config(&self) -> anyhow::Result<SamplerConfig> {
        let valid = self.temp >= 0.0 && (0.0..=1.0).contains(&self.top_p) && (0.0..=1.0).contains(&self.min_p) && self.repeat_penalty > 0.0;
        if !valid {
            anyhow::bail!("sampling values out of range: --temp ≥ 0, --top-p and --min-p in [0, 1], --repeat-penalty > 0");
        }
        let seed = self.seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
        Ok(SamplerConfig {
            temperature: if self.greedy { 0.0 } else { self.temp },
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
        })
    }
}

/// A progress line on stderr, redrawn in place; only on a terminal.
pub fn progress(what: &str) -> impl FnMut(usize, usize) + '_ {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    move |done, total| {
        if tty {
            eprint!("\r{what}: tensor {done}/{total}");
            let _ = std::io::stderr().flush();
            if done == total {
                eprintln!();
            }
        }
    }
}

/// Prints to stdout; a closed pipe (`| head`) is not an error.
pub fn print(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
