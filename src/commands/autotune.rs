//! `bitnet autotune`: measure tile candidates on this machine and keep
//! the results in the tuning database; list, export, import or clear it.

use super::DeviceArgs;
use anyhow::Context;
use bitnet_autotune::harness::parse_duration;
use bitnet_autotune::tune::{self, JobReport, TuneOptions};
use bitnet_autotune::{Database, Tuned};
use bitnet_codegen::schedule::{TileSource, Workload};
use bitnet_codegen::target::HostCpu;
use bitnet_frontends::model::Model;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AutotuneArgs {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Tune every kernel workload of this model (GGUF file or Hugging Face folder).
    #[arg(short, long, conflicts_with = "shapes")]
    pub model: Option<PathBuf>,
    /// Tune a standard set of shapes instead of a model's (2b4t).
    #[arg(long)]
    pub shapes: Option<String>,
    /// Time for the whole sweep, like 90s or 2m.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub budget: Duration,
    /// Threads the kernels will run with [default: all cores].
    #[arg(short, long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(clap::Subcommand)]
pub enum Action {
    /// Show the tuned tiles for this machine, and what else the database holds.
    List,
    /// Write the whole database to FILE.
    Export { file: PathBuf },
    /// Merge the records of FILE (written by `export`) into the database.
    Import { file: PathBuf },
    /// Delete every record.
    Clear,
}

pub fn autotune(a: AutotuneArgs) -> anyhow::Result<()> {
    let db = Database::open_default().map_err(anyhow::Error::msg)?;
    match a.action {
        Some(Action::List) => return list(&db),
        Some(Action::Export { file }) => {
            let n = db.export(&file).map_err(anyhow::Error::msg)?;
            eprintln!("wrote {n} records to {}", file.display());
            return Ok(());
        }
        Some(Action::Import { file }) => {
            let (n, problems) = db.import(&file).map_err(anyhow::Error::msg)?;
            problems.iter().for_each(|p| eprintln!("warning: {p}"));
            eprintln!("merged {n} records from {} into {}", file.display(), db.path.display());
            return Ok(());
        }
        Some(Action::Clear) => {
            let n = db.clear().map_err(anyhow::Error::msg)?;
            eprintln!("removed {n} records from {}", db.path.display());
            return Ok(());
        }
        None => {}
    }
    let workloads = match (&a.model, &a.shapes) {
        (Some(m), _) => {
            let model = Model::open(m).with_context(|| format!("loading {}", m.display()))?;
            if a.device.device == super::Device::Cuda {
                bitnet_runtime::cuda_workloads(&model)?
            } else {
                bitnet_runtime::workloads(&model)?
            }
        }
        (None, Some(s)) => tune::shapes(s).map_err(anyhow::Error::msg)?,
        (None, None) => anyhow::bail!("give -m MODEL or --shapes 2b4t (or list, export, import, clear)"),
    };
    if a.device.device == super::Device::Cuda {
        return sweep_cuda(&workloads, &db);
    }
    let threads = super::threads(a.threads)?;
    let reports = sweep(&workloads, threads, a.budget, &db)?;
    super::print(&table(&reports))?;
    eprintln!("{} records in {}; `bitnet compile` and `bitnet run` use them for {threads} threads", db.load().records.len(), db.path.display());
    Ok(())
}

/// Tunes `workloads` with a progress bar on stderr.
pub fn sweep(workloads: &[Workload], threads: usize, budget: Duration, db: &Database) -> anyhow::Result<Vec<JobReport>> {
    let cpu = HostCpu::detect();
    eprintln!("tuning {} workloads for {threads} threads on {} ({}), within {:.0} s", workloads.len(), cpu.model, cpu.fingerprint(), budget.as_secs_f64());
    let opts = TuneOptions { threads, budget };
    with_progress(|progress| tune::tune(workloads, &opts, db, progress)).map_err(anyhow::Error::msg)
}

/// Runs a sweep with a progress bar on stderr, fed by the sweep's
/// `progress(done, total, what)` calls.
fn with_progress<T>(sweep: impl FnOnce(&mut dyn FnMut(usize, usize, &str)) -> T) -> T {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} {msg}").expect("a valid template"));
    let out = sweep(&mut |done, total, what| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(what.to_string());
    });
    bar.finish_and_clear();
    out
}

/// Tunes the CUDA matrix products of `workloads` on this machine's GPU.
fn sweep_cuda(workloads: &[Workload], db: &Database) -> anyhow::Result<()> {
    let (fingerprint, _) = bitnet_runtime::cuda_tune::gpu().map_err(|e| anyhow::anyhow!("autotune --device cuda: {e}"))?;
    eprintln!("tuning {} workloads on {fingerprint}", workloads.len());
    let reports = with_progress(|progress| bitnet_runtime::cuda_tune::tune(workloads, db, progress)).map_err(anyhow::Error::msg)?;
    super::print(&table(&reports))?;
    eprintln!(
        "{} records in {}; `bitnet run --device cuda` and `bitnet compile --device cuda` use them on this GPU",
        db.load().records.len(),
        db.path.display()
    );
    Ok(())
}

fn micros(ns: Option<u64>) -> String {
    ns.map_or("-".into(), |ns| format!("{:.1} µs", ns as f64 / 1e3))
}

/// Kernel, phase, default time, tuned time and tiles, speed-up.
fn table(reports: &[JobReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<32} {:<8} {:>12} {:>12} {:<42} {:>8}  checked", "kernel", "phase", "default", "tuned", "tuned tiles", "speed-up");
    for r in reports {
        if let Some(why) = &r.skipped {
            let _ = writeln!(out, "{:<32} {:<8} skipped: {why}", r.key.to_string(), r.phase.name());
            continue;
        }
        let tiles = r.tuned.map_or("-".into(), |t| t.to_string());
        let speedup = r.speedup().map_or("-".into(), |s| format!("{s:.2}×"));
        let _ = writeln!(
            out,
            "{:<32} {:<8} {:>12} {:>12} {:<42} {:>8}  {} timed of {}{}",
            r.key.to_string(),
            r.phase.name(),
            micros(r.default_ns),
            micros(r.tuned_ns),
            tiles,
            speedup,
            r.timed,
            r.candidates,
            if r.wrong > 0 { format!(", {} wrong", r.wrong) } else { String::new() }
        );
    }
    out
}

fn list(db: &Database) -> anyhow::Result<()> {
    let loaded = db.load();
    loaded.problems.iter().for_each(|p| eprintln!("warning: {p}"));
    let here = HostCpu::detect().fingerprint();
    let mut out = String::new();
    writeln!(out, "database: {} ({} records)", db.path.display(), loaded.records.len())?;
    writeln!(out, "this machine: {here}")?;
    let mut by_threads: BTreeMap<usize, Vec<_>> = BTreeMap::new();
    let mut other = BTreeMap::<&str, usize>::new();
    for r in &loaded.records {
        if r.fingerprint == here {
            by_threads.entry(r.threads).or_default().push(r.clone());
        } else {
            *other.entry(&r.fingerprint).or_default() += 1;
        }
    }
    for (threads, records) in by_threads {
        let keys: std::collections::BTreeSet<_> = records.iter().map(|r| r.key.clone()).collect();
        let tuned = Tuned::new(records.clone(), &here, threads);
        writeln!(out, "{threads} threads:")?;
        for key in keys {
            let n = records.iter().filter(|r| r.key == key).count();
            let tiles = tuned.tiles(&key).map_or("(nothing timed)".into(), |t| t.to_string());
            writeln!(out, "  {:<32} {:<30} {n} measurements", key.to_string(), tiles)?;
        }
    }
    for (fp, n) in other {
        if let Some(gpu) = fp.strip_prefix("cuda ") {
            // GPUs: the tiles `--device cuda` takes on a machine with that GPU.
            let tuned = bitnet_autotune::db::CudaTuned::new(&loaded.records, fp);
            let keys: std::collections::BTreeSet<_> = loaded.records.iter().filter(|r| r.fingerprint == fp).map(|r| r.key.clone()).collect();
            writeln!(out, "GPU {gpu}:")?;
            let sm = bitnet_runtime::cuda::fingerprint_sm(fp).unwrap_or(bitnet_codegen::cuda::nvrtc::DEFAULT_SM);
            for key in keys.iter().filter(|k| tuned.contains(k)) {
                writeln!(out, "  {:<32} {}", key.to_string(), tuned.tiles(key, sm))?;
            }
            continue;
        }
        writeln!(out, "other machine {fp}: {n} records (not used here)")?;
    }
    super::print(&out)
}
