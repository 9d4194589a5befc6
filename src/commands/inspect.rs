//! `bitnet inspect` and `bitnet tokenize`: read-only views of a model file.
//! Both work on vocabulary-only GGUF files.

use anyhow::Context;
use bitnet_frontends::gguf::{GgufFile, MetaValue};
use bitnet_frontends::model::Model;
use bitnet_frontends::tokenizer::Tokenizer;
use std::fmt::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// Model or vocabulary file (GGUF).
    pub model: PathBuf,
    /// Also print every metadata key.
    #[arg(long)]
    pub metadata: bool,
}

#[derive(clap::Args)]
pub struct TokenizeArgs {
    #[arg(short, long)]
    pub model: PathBuf,
    /// Do not add BOS even if the model asks for it.
    #[arg(long)]
    pub no_bos: bool,
    /// Print {"ids": [...]}.
    #[arg(long)]
    pub json: bool,
    /// Parse special-token text (like `<|eot_id|>`) as special tokens.
    #[arg(long)]
    pub special: bool,
    pub text: String,
}

fn open(path: &std::path::Path) -> anyhow::Result<GgufFile> {
    GgufFile::open(path).with_context(|| format!("reading {}", path.display()))
}

pub fn tokenize(a: TokenizeArgs) -> anyhow::Result<()> {
    let f = open(&a.model)?;
    let tok = Tokenizer::from_gguf(&f)?;
    let ids = tok.encode(&a.text, tok.add_bos && !a.no_bos, a.special)?;
    if a.json {
        println!("{}", serde_json::json!({ "ids": ids }));
    } else {
        println!("{}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "));
    }
    Ok(())
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

pub fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let mut out = String::new();
    let f = open(&a.model)?;
    writeln!(out, "file: {} ({}, GGUF v{}, alignment {})", a.model.display(), human(f.file_size()), f.version, f.alignment)?;
    if let Some(name) = f.get("general.name").and_then(MetaValue::as_str) {
        writeln!(out, "name: {name}")?;
    }
    let n_tensors = f.tensors.len();
    let model = if n_tensors > 0 { Some(Model::from_file(f)) } else { None };
    let f = match model {
        Some(Ok(m)) => {
            let c = &m.config;
            writeln!(out, "architecture: {} ({:?})", c.arch_name, c.arch)?;
            writeln!(
                out,
                "  hidden {} | layers {} | heads {} (kv {}) head dim {} | ffn {} | vocab {} | context {}",
                c.hidden, c.layers, c.heads, c.kv_heads, c.head_dim, c.ffn, c.vocab, c.context
            )?;
            writeln!(
                out,
                "  activation {} | rope {} θ {} | rms eps {} | head {}",
                c.activation.name(),
                c.rope_mode.name(),
                c.rope_theta,
                c.norm_eps,
                if c.tied_head { "tied to token_embd" } else { "output.weight" }
            )?;
            if let Err(e) = m.graph(false) {
                writeln!(out, "  cannot run: {e}")?;
            }
            m.file
        }
        Some(Err(e)) => {
            writeln!(out, "architecture: cannot be run: {e}")?;
            open(&a.model)?
        }
        None => {
            writeln!(out, "architecture: none (vocabulary-only file)")?;
            open(&a.model)?
        }
    };
    match Tokenizer::from_gguf(&f) {
        Ok(t) => {
            let name = |id: Option<u32>| id.map_or("none".to_string(), |i| format!("{i} {:?}", t.piece(i).unwrap_or("")));
            writeln!(out, "tokenizer: {}", t.kind)?;
            writeln!(out, "  bos {} | eos {} | eot {} | add bos {}", name(t.bos), name(t.eos), name(t.eot), t.add_bos)?;
            writeln!(out, "  chat template: {}", if t.chat_template.is_some() { "yes" } else { "no" })?;
        }
        Err(e) => writeln!(out, "tokenizer: {e}")?,
    }
    if a.metadata {
        writeln!(out, "metadata ({} keys):", f.metadata.len())?;
        for (k, v) in &f.metadata {
            writeln!(out, "  {k} = {v}")?;
        }
    }
    if !f.tensors.is_empty() {
        let total: usize = f.tensors.iter().map(|t| t.size).sum();
        writeln!(out, "tensors ({}, {}):", f.tensors.len(), human(total))?;
        writeln!(out, "  {:<32} {:<6} {:<16} {:>12}", "name", "type", "shape", "bytes")?;
        for t in &f.tensors {
            writeln!(out, "  {:<32} {:<6} {:<16} {:>12}", t.name, t.dtype.name(), format!("{:?}", t.shape), t.size)?;
        }
    }
    super::print(&out)
}
