//! `bitnet inspect` and `bitnet tokenize`: read-only views of a model file.
//! Both work on vocabulary-only GGUF files.

use anyhow::Context;
use bitnet_codegen::cpu::Isa;
use bitnet_frontends::family;
use bitnet_frontends::gguf::{GgufFile, MetaValue};
use bitnet_frontends::model::{Model, ModelSource};
use bitnet_frontends::tokenizer::Tokenizer;
use bitnet_ir::DType;
use bitnet_runtime::artifact;
use std::fmt::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// Model or vocabulary file (GGUF), or a Hugging Face folder.
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

/// `check_graph`: say whether the graph can be built from these tensors
/// (an artifact's ternary weights are stored packed, under other names).
fn describe_model(m: &Model, check_graph: bool, out: &mut String) -> anyhow::Result<()> {
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
    match family::infer(m) {
        Some((f, how)) => {
            let how = match how {
                family::Match::Exact => "its published shape",
                family::Match::Named => "a reduced size of it, as the file names it",
            };
            writeln!(out, "family: {}", f.name)?;
            writeln!(out, "  {} ({how}); GGUF arch for bitnet.cpp: {}", f.repo, f.gguf_arch)?;
        }
        None if c.bitlinear => writeln!(out, "family: none of the published ones")?,
        None => writeln!(out, "family: none (not a BitNet b1.58 model)")?,
    }
    writeln!(
        out,
        "  BitLinear projections {} | sub-norms {}",
        if c.bitlinear { "yes (int8 per-token activations, ternary weights)" } else { "no" },
        if c.sub_norms { "yes" } else { "no" }
    )?;
    if let (true, Err(e)) = (check_graph, m.graph(false)) {
        writeln!(out, "  cannot run: {e}")?;
    }
    Ok(())
}

fn describe_tokenizer(t: Result<Tokenizer, impl std::fmt::Display>, out: &mut String) -> anyhow::Result<()> {
    match t {
        Ok(t) => {
            let name = |id: Option<u32>| id.map_or("none".to_string(), |i| format!("{i} {:?}", t.piece(i).unwrap_or("")));
            writeln!(out, "tokenizer: {}", t.kind)?;
            writeln!(out, "  bos {} | eos {} | eot {} | add bos {}", name(t.bos), name(t.eos), name(t.eot), t.add_bos)?;
            writeln!(out, "  chat template: {}", if t.chat_template.is_some() { "yes" } else { "no" })?;
        }
        Err(e) => writeln!(out, "tokenizer: {e}")?,
    }
    Ok(())
}

fn tensor_table<'a>(rows: impl Iterator<Item = (&'a str, DType, &'a [usize], usize)>, out: &mut String) -> anyhow::Result<()> {
    let rows: Vec<_> = rows.collect();
    if rows.is_empty() {
        return Ok(());
    }
    let total: usize = rows.iter().map(|r| r.3).sum();
    writeln!(out, "tensors ({}, {}):", rows.len(), human(total))?;
    writeln!(out, "  {:<32} {:<6} {:<16} {:>12}", "name", "type", "shape", "bytes")?;
    for (name, dtype, shape, size) in rows {
        writeln!(out, "  {:<32} {:<6} {:<16} {:>12}", name, dtype.name(), format!("{shape:?}"), size)?;
    }
    Ok(())
}

pub fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let mut out = String::new();
    if artifact::is_artifact(&a.model) {
        describe_artifact(&a.model, &mut out)?;
        return super::print(&out);
    }
    if a.model.is_dir() {
        let m = Model::open(&a.model).with_context(|| format!("reading {}", a.model.display()))?;
        writeln!(out, "folder: {} (Hugging Face)", a.model.display())?;
        describe_model(&m, true, &mut out)?;
        describe_tokenizer(m.tokenizer(), &mut out)?;
        writeln!(out, "{}", super::isa_line(Isa::best(), false))?;
        writeln!(out, "(tensors under their GGUF names; ternary projections are converted to I2_S at load)")?;
        tensor_table(m.tensors.iter().map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice(), m.data(t).len())), &mut out)?;
        return super::print(&out);
    }
    let f = open(&a.model)?;
    writeln!(out, "file: {} ({}, GGUF v{}, alignment {})", a.model.display(), human(f.file_size()), f.version, f.alignment)?;
    if let Some(name) = f.get("general.name").and_then(MetaValue::as_str) {
        writeln!(out, "name: {name}")?;
    }
    let model = if f.tensors.is_empty() { None } else { Some(Model::from_file(f)) };
    let f = match model {
        Some(Ok(m)) => {
            describe_model(&m, true, &mut out)?;
            match m.source {
                ModelSource::Gguf(f) => f,
                ModelSource::Hf(_) => unreachable!(),
            }
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
    describe_tokenizer(Tokenizer::from_gguf(&f), &mut out)?;
    writeln!(out, "{}", super::isa_line(Isa::best(), false))?;
    if a.metadata {
        writeln!(out, "metadata ({} keys):", f.metadata.len())?;
        for (k, v) in &f.metadata {
            writeln!(out, "  {k} = {v}")?;
        }
    }
    tensor_table(f.tensors.iter().map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice(), t.size)), &mut out)?;
    super::print(&out)
}

/// A compiled artifact: where it came from, what it was compiled for, its
/// kernels with their tiles and where the tiles came from, its weights.
fn describe_artifact(path: &std::path::Path, out: &mut String) -> anyhow::Result<()> {
    let a = artifact::Artifact::open(path)?;
    let h = &a.header;
    let size = std::fs::metadata(path)?.len() as usize;
    writeln!(out, "artifact: {} ({}, format v{}, by {})", path.display(), human(size), h.format, h.compiler)?;
    writeln!(out, "source: {} ({}, content hash {})", h.source.path, human(h.source.bytes as usize), h.source.hash)?;
    writeln!(out, "target: {}, fingerprint {}: {}", h.target.device, h.target.fingerprint, h.target.description)?;
    let gpu = bitnet_runtime::cuda::device();
    let stale = h.cuda.as_ref().is_some_and(|c| c.step.is_none());
    match (a.check_target(path), h.target.device.as_str(), &gpu) {
        (_, "cuda", _) if stale => writeln!(out, "runs here: no: an earlier bitnet-rs compiled its CUDA kernels for one sequence at a time; compile it again")?,
        (_, "cuda", Err(e)) => writeln!(out, "runs here: no: {e}")?,
        (_, "cuda", Ok((_, name))) => writeln!(out, "runs here: on {name}, if it is sm_{} or later", h.cuda.as_ref().map_or(0, |c| c.sm))?,
        (Ok(w), _, _) if w.is_empty() => writeln!(out, "runs here: yes")?,
        (Ok(w), _, _) => writeln!(out, "runs here: yes, but {}", w.join("; "))?,
        (Err(e), _, _) => writeln!(out, "runs here: no: {e}")?,
    }
    writeln!(out, "head: {}", h.head)?;
    describe_model(&a.model, false, out)?;
    describe_tokenizer(a.model.tokenizer(), out)?;
    if let Some(c) = &h.cuda {
        let Some(step) = &c.step else {
            writeln!(out, "CUDA kernels: for one sequence at a time, from an earlier bitnet-rs (compile it again to run it)")?;
            return Ok(());
        };
        let entries: std::collections::BTreeSet<&str> = step.launches.iter().flat_map(|l| l.entries()).collect();
        writeln!(
            out,
            "CUDA kernels: {} ({} launches a step of many tokens, {} of one, KV blocks of {} positions), {} of PTX for sm_{} from NVRTC {}",
            entries.len(),
            step.launches.len(),
            step.launches_for(1),
            1u64 << step.block_shift.min(63),
            human(c.ptx.len()),
            c.sm,
            c.nvrtc
        )?;
        writeln!(out, "  {:<6} {:<44} tiles", "value", "workload")?;
        for (v, key, tiles) in &step.tiles {
            writeln!(out, "  {:<6} {:<44} {tiles}", v.to_string(), key)?;
        }
        let f = a.model.gguf().expect("an artifact's weights section is GGUF");
        return tensor_table(f.tensors.iter().map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice(), t.size)), out);
    }
    let steps: Vec<_> = h.graphs.iter().flat_map(|g| &g.schedule.steps).collect();
    writeln!(out, "kernels ({} in the step graph):", steps.len())?;
    writeln!(out, "  {:<6} {:<44} {:<32} from", "value", "workload", "tiles")?;
    for s in steps {
        writeln!(out, "  {:<6} {:<44} {:<32} {}", s.value.to_string(), s.key.to_string(), s.tiles.to_string(), s.origin.name())?;
    }
    let f = a.model.gguf().expect("an artifact's weights section is GGUF");
    tensor_table(f.tensors.iter().map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice(), t.size)), out)
}
