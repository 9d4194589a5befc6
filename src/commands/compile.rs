//! `bitnet compile`: lower a model's graph for this machine.

use super::DeviceArgs;
use anyhow::Context;
use bitnet_codegen::schedule::Pinned;
use bitnet_frontends::model::Model;
use bitnet_ir::passes;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CompileArgs {
    /// Model: a GGUF file or a Hugging Face folder.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Artifact to write (.bnx).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print the graph in its text form after this pass (canonicalize,
    /// specialize-ternary, fuse) or, with `schedule`, the final graph and
    /// its schedule; then stop.
    #[arg(long, value_name = "PASS")]
    pub dump_after: Option<String>,
    /// Lower the graph that computes logits at every position.
    #[arg(long)]
    pub all_logits: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn compile(a: CompileArgs) -> anyhow::Result<()> {
    a.device.check()?;
    let model = Model::open(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let graph = model.graph(a.all_logits)?;
    match a.dump_after.as_deref() {
        Some("schedule") => {
            let (g, s) = bitnet_runtime::lower(&graph, &Pinned::default())?;
            return super::print(&format!("{g}{s}"));
        }
        Some(pass) => {
            let g = passes::optimize(graph, Some(pass)).map_err(|e| anyhow::anyhow!("{e} (or schedule)"))?;
            return super::print(&g.to_string());
        }
        None => {}
    }
    let (g, s) = bitnet_runtime::lower(&graph, &Pinned::default())?;
    match a.output {
        Some(out) => anyhow::bail!(
            "writing {}: .bnx artifacts are not implemented yet; `bitnet run -m {}` compiles in memory ({} nodes, {} scheduled kernels here)",
            out.display(),
            a.model.display(),
            g.nodes.len(),
            s.steps.len()
        ),
        None => {
            eprintln!("compiled {}: {} nodes, {} scheduled kernels (nothing written: give -o FILE.bnx, or --dump-after PASS to look)", a.model.display(), g.nodes.len(), s.steps.len());
            Ok(())
        }
    }
}
