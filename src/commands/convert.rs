//! `bitnet convert`: GGUF or Hugging Face folder → GGUF for a target engine.

use anyhow::Context;
use bitnet_frontends::convert::{self, ConvertOptions};
use bitnet_frontends::model::Model;
use bitnet_ir::DType;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// A GGUF file or a Hugging Face model folder.
    pub input: PathBuf,
    #[arg(short, long)]
    pub output: PathBuf,
    /// BitLinear weights: i2_s (bitnet.cpp), tq2_0 or tq1_0 (llama.cpp), or f32/f16;
    /// for plain (non-ternary) models the type of every matrix: f32, f16, bf16.
    #[arg(long = "type")]
    pub weight_type: String,
    /// Token embedding / head: f16, bf16, f32, q8_0, q6_k, q4_k [default: as stored; f16 from HF bf16].
    #[arg(long)]
    pub head_type: Option<String>,
}

fn dtype(s: &str, flag: &str) -> anyhow::Result<DType> {
    DType::from_name(&s.to_lowercase()).with_context(|| format!("{flag} {s}: unknown type"))
}

pub fn convert(a: ConvertArgs) -> anyhow::Result<()> {
    let model = Model::open(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let opts =
        ConvertOptions { weight_type: dtype(&a.weight_type, "--type")?, head_type: a.head_type.as_deref().map(|h| dtype(h, "--head-type")).transpose()? };
    let started = std::time::Instant::now();
    let what = format!("converting {} → {}", a.input.display(), a.output.display());
    let warnings = convert::convert(&model, &opts, &a.output, super::progress(&what)).map_err(anyhow::Error::msg)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    eprintln!("wrote {} ({:.1} MB) in {:.1} s", a.output.display(), size as f64 / 1e6, started.elapsed().as_secs_f64());
    Ok(())
}
