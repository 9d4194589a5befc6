//! `bitnet compile`: lower a model for this machine and write an artifact.

use super::{head_parser, Device, DeviceArgs};
use anyhow::Context;
use bitnet_autotune::{tune, Database};
use bitnet_codegen::schedule::{HeadQuant, Pinned, TileOrigin};
use bitnet_frontends::model::Model;
use bitnet_ir::passes;
use bitnet_runtime::{artifact, BackendKind, Engine, EngineOptions, LoadOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TuneArg {
    Quick,
}

#[derive(clap::Args)]
pub struct CompileArgs {
    /// Model: a GGUF file or a Hugging Face folder.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Artifact to write (conventionally .bnx); run it with `bitnet run -m`.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Output head: as stored, or quantized: q8 (int8 per row, half the
    /// bytes of an f16 head) or q4 (4-bit groups of 32 with f16 scales,
    /// 28% of them); lossy.
    #[arg(long, value_parser = head_parser(), default_value = "stored")]
    pub head: HeadQuant,
    /// Print the graph in its text form after this pass (canonicalize,
    /// specialize-ternary, fuse) or, with `schedule`, the final graph and
    /// its schedule; then stop.
    #[arg(long, value_name = "PASS")]
    pub dump_after: Option<String>,
    /// Lower the graph that computes logits at every position (for
    /// --dump-after) instead of the one the runtime runs, the step graph
    /// (the logits of the rows each step asks for).
    #[arg(long)]
    pub all_logits: bool,
    /// Threads the artifact will run with: tiles are tuned per thread count
    /// [default: all cores].
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Use the default tiles, not those in the tuning database.
    #[arg(long, conflicts_with = "tune")]
    pub no_tune: bool,
    /// First tune the workloads the database lacks (`quick`: a 20 s sweep).
    #[arg(long, value_enum)]
    pub tune: Option<TuneArg>,
    #[command(flatten)]
    pub isa: super::IsaArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// GPU architecture the PTX targets (with --device cuda): 80 runs on
    /// Ampere and later.
    #[arg(long, default_value_t = bitnet_codegen::cuda::nvrtc::DEFAULT_SM, value_parser = clap::value_parser!(u32).range(50..))]
    pub sm: u32,
}

pub fn compile(a: CompileArgs) -> anyhow::Result<()> {
    if artifact::is_artifact(&a.model) {
        anyhow::bail!("{} is already a compiled artifact; compile its source model instead", a.model.display());
    }
    a.isa.check(a.device.device)?;
    if a.device.device == Device::Cuda {
        return compile_cuda(&a);
    }
    let pinned = Pinned { head: a.head, isa: a.isa.isa, packing: a.isa.packing, ..Default::default() };
    let threads = super::threads(a.threads)?;
    if let Some(pass) = a.dump_after.as_deref() {
        let model = Model::open(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
        let graph = if a.all_logits { model.graph(true)? } else { model.step_graph()? };
        if pass == "schedule" {
            let mut warnings = Vec::new();
            let tuned = if a.no_tune { None } else { bitnet_runtime::tuned_tiles(threads, &pinned, &mut warnings) };
            warnings.iter().for_each(|w| eprintln!("warning: {w}"));
            let (g, s) = bitnet_runtime::lower(&graph, &pinned, tuned.as_ref().map(|t| t as _))?;
            return super::print(&format!("{g}{s}"));
        }
        let g = passes::optimize(graph, Some(pass)).map_err(|e| anyhow::anyhow!("{e} (or schedule)"))?;
        return super::print(&g.to_string());
    }
    let Some(out) = a.output else {
        anyhow::bail!("nothing to do: give -o FILE.bnx to write an artifact, or --dump-after PASS to look at the graph");
    };
    let t0 = Instant::now();
    if a.tune == Some(TuneArg::Quick) {
        let model = Model::open(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
        let db = Database::open_default().map_err(anyhow::Error::msg)?;
        let todo = tune::missing(&bitnet_runtime::workloads(&model)?, &db, threads);
        if todo.is_empty() {
            eprintln!("tuning: the database has every workload of this model for {threads} threads");
        } else {
            super::autotune::sweep(&todo, threads, Duration::from_secs(20), &db)?;
        }
    }
    eprintln!("compiling {} ...", a.model.display());
    let load = LoadOptions { threads, backend: BackendKind::Compiled, pinned, context: None, tuning: !a.no_tune, ..Default::default() };
    let opts = EngineOptions { load, ..Default::default() };
    let engine = Engine::open(&a.model, &opts).with_context(|| format!("loading {}", a.model.display()))?;
    engine.warnings.iter().for_each(|w| eprintln!("warning: {w}"));
    let (kernels, tuned) = engine.with_backend(|b| {
        let steps = b.as_compiled().map_or(&[][..], |c| &c.schedule().steps[..]);
        (steps.len(), steps.iter().filter(|s| s.origin == TileOrigin::Database).count())
    });
    eprintln!("writing {} ...", out.display());
    let report = engine.write_artifact(&out, &a.model)?;
    eprintln!(
        "wrote {}: {:.1} MB, {} tensors, {} scheduled kernels ({} with tuned tiles), in {:.1} s",
        out.display(),
        report.bytes as f64 / 1e6,
        report.tensors,
        kernels,
        tuned,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `compile --device cuda`: lowers the model to CUDA kernels and compiles
/// them with NVRTC (no GPU needed). With `--dump-after schedule` it prints
/// the final graph and its launches.
fn compile_cuda(a: &CompileArgs) -> anyhow::Result<()> {
    let head = a.head;
    if head == HeadQuant::Q4 {
        anyhow::bail!("--head q4 is a CPU option; the CUDA backend reads the head as stored or as int8 rows (--head q8)");
    }
    if head != HeadQuant::Stored && a.dump_after.is_none() {
        anyhow::bail!("a CUDA artifact holds the head as stored; --head q8 quantizes it when the model is loaded: run it with `bitnet run -m MODEL --device cuda --head q8`");
    }
    let model = Model::open(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let graph = if a.all_logits { model.graph(true)? } else { model.step_graph()? };
    // Tiles measured on this machine's GPU, if it has one.
    let mut warnings = Vec::new();
    let tuned = if a.no_tune { None } else { bitnet_runtime::cuda_tuned_tiles(&mut warnings) };
    warnings.iter().for_each(|w| eprintln!("warning: {w}"));
    match a.dump_after.as_deref() {
        Some("schedule") => {}
        Some(pass) => {
            let g = passes::optimize(graph, Some(pass)).map_err(|e| anyhow::anyhow!("{e} (or schedule)"))?;
            return super::print(&g.to_string());
        }
        None => {
            let Some(out) = &a.output else {
                anyhow::bail!("nothing to do: give -o FILE.bnx to write a CUDA artifact, or --dump-after PASS to look at the graph and its kernels");
            };
            let t0 = Instant::now();
            eprintln!("compiling {} for CUDA (PTX for sm_{}) ...", a.model.display(), a.sm);
            let report = artifact::write_cuda(out, &a.model, &model, a.sm, tuned.as_ref())?;
            eprintln!("wrote {}: {:.1} MB, {} tensors, in {:.1} s", out.display(), report.bytes as f64 / 1e6, report.tensors, t0.elapsed().as_secs_f64());
            return Ok(());
        }
    }
    let (g, program) = bitnet_runtime::lower_cuda(&graph, a.sm, tuned.as_ref(), head)?;
    let t0 = Instant::now();
    let source = bitnet_codegen::cuda::module_source(&[&program]);
    let ptx = bitnet_codegen::cuda::nvrtc::compile(&source, a.sm).map_err(anyhow::Error::msg)?;
    let mut out = format!("{g}launches {{\n");
    for l in &program.launches {
        out += &format!("    {} {} grid={:?} block={}", l.value, l.entry, l.grid, l.block);
        if let Some(v) = &l.one_token {
            out += &format!(" one_token={} grid={:?} block={}", v.entry, v.grid, v.block);
        }
        if l.skip_one_token {
            out += " one_token=skipped";
        }
        out += "\n";
    }
    out += "}\ntiles {\n";
    for (v, key, tiles) in &program.tiles {
        out += &format!("    {v} {key}: {tiles}\n");
    }
    out += "}\n";
    eprintln!(
        "{} kernels, {} launches ({} for one token): {} bytes of CUDA C compiled by NVRTC ({}) to {} bytes of PTX for sm_{} in {:.1} s",
        program.kernels.len(),
        program.launches.len(),
        program.launches_for(1),
        source.len(),
        bitnet_codegen::cuda::nvrtc::library().map(|p| p.display().to_string()).unwrap_or_default(),
        ptx.len(),
        a.sm,
        t0.elapsed().as_secs_f64()
    );
    super::print(&out)
}
