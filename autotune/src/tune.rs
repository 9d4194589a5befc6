//! A whole sweep: every (workload, phase) job of a model or a standard
//! shape set, inside one time budget, each job's measurements written to
//! the database as soon as it finishes (an interrupted sweep keeps them).

use crate::db::{now, Database, Record};
use crate::harness::{best, sweep, Measured, Outcome};
use crate::kernels::kernel;
use crate::space::{candidates, Phase, SPACE_VERSION};
use bitnet_codegen::schedule::{Tiles, Workload, WorkloadKey};
use bitnet_codegen::target::HostCpu;
use bitnet_ir::DType;
use std::time::{Duration, Instant};

/// The matrix products of BitNet b1.58 2B4T: q/o, k/v, gate/up, down, and
/// the tied f16 head.
pub fn shapes_2b4t() -> Vec<Workload> {
    vec![
        Workload::Ternary { n: 2560, k: 2560 },
        Workload::Ternary { n: 640, k: 2560 },
        Workload::Ternary { n: 6912, k: 2560 },
        Workload::Ternary { n: 2560, k: 6912 },
        Workload::Float { n: 128256, k: 2560, dtype: DType::F16 },
    ]
}

/// A standard shape set by name.
pub fn shapes(name: &str) -> Result<Vec<Workload>, String> {
    match name {
        "2b4t" => Ok(shapes_2b4t()),
        _ => Err(format!("unknown shape set {name:?} (known: 2b4t)")),
    }
}

/// One job's result, for the table.
#[derive(Clone, Debug)]
pub struct JobReport {
    pub key: WorkloadKey,
    pub phase: Phase,
    pub default: Tiles,
    pub default_ns: Option<u64>,
    pub tuned: Option<Tiles>,
    pub tuned_ns: Option<u64>,
    pub timed: usize,
    pub wrong: usize,
    pub candidates: usize,
    /// Why the job could not run, if it could not.
    pub skipped: Option<String>,
}

impl JobReport {
    pub fn speedup(&self) -> Option<f64> {
        Some(self.default_ns? as f64 / self.tuned_ns? as f64)
    }
}

/// One (workload, phase) job of a sweep, on one machine.
pub struct Job<'a> {
    pub key: WorkloadKey,
    pub phase: Phase,
    pub fingerprint: &'a str,
    pub threads: usize,
}

/// A job's report and database records from its candidates' measurements
/// (`candidates[0]` is the default), or from why it could not run.
pub fn conclude(job: &Job, candidates: &[Tiles], measured: Result<Vec<Measured>, String>) -> (JobReport, Vec<Record>) {
    let mut report = JobReport {
        key: job.key.clone(),
        phase: job.phase,
        default: candidates[0],
        default_ns: None,
        tuned: None,
        tuned_ns: None,
        timed: 0,
        wrong: 0,
        candidates: candidates.len(),
        skipped: None,
    };
    let measured = match measured {
        Ok(m) => m,
        Err(e) => {
            report.skipped = Some(e);
            return (report, Vec::new());
        }
    };
    report.default_ns = measured.first().and_then(Measured::ns);
    if let Some(b) = best(&measured) {
        report.tuned = Some(b.tiles);
        report.tuned_ns = b.ns();
    }
    report.timed = measured.iter().filter(|m| m.ns().is_some()).count();
    report.wrong = measured.iter().filter(|m| matches!(m.outcome, Outcome::Wrong(_))).count();
    let records = measured
        .iter()
        .map(|m| Record {
            key: job.key.clone(),
            phase: job.phase,
            fingerprint: job.fingerprint.to_string(),
            threads: job.threads,
            space: SPACE_VERSION,
            tiles: m.tiles,
            ns: m.ns(),
            status: match &m.outcome {
                Outcome::Timed { .. } => "ok".into(),
                Outcome::Wrong(e) => format!("wrong: {e}"),
                Outcome::NotTimed => "not timed".into(),
            },
            at: now(),
        })
        .collect();
    (report, records)
}

pub struct TuneOptions {
    pub threads: usize,
    pub budget: Duration,
}

/// Tunes every workload's phases within the budget; `progress(done, total,
/// what)` is called before each job and once at the end.
pub fn tune(workloads: &[Workload], opts: &TuneOptions, db: &Database, mut progress: impl FnMut(usize, usize, &str)) -> Result<Vec<JobReport>, String> {
    let fingerprint = HostCpu::detect().fingerprint();
    let jobs: Vec<(Workload, Phase)> = workloads.iter().flat_map(|w| Phase::of(w).iter().map(move |&p| (*w, p))).collect();
    let start = Instant::now();
    let end = start + opts.budget;
    let mut reports = Vec::new();
    // Heavier jobs get a larger share of what is left.
    let weight = |(w, p): &(Workload, Phase)| -> f64 {
        let (n, k) = match w {
            Workload::Ternary { n, k } | Workload::Float { n, k, .. } => (*n, *k),
        };
        (n * k) as f64 * if *p == Phase::Prefill { 4.0 } else { 1.0 }
    };
    for (i, job) in jobs.iter().enumerate() {
        let (w, phase) = job;
        let key = w.key();
        progress(i, jobs.len(), &format!("{key} ({})", phase.name()));
        let cands = candidates(w, *phase);
        let left: f64 = jobs[i..].iter().map(weight).sum();
        let share = end.saturating_duration_since(Instant::now()).mul_f64(weight(job) / left.max(1.0));
        let measured = kernel(w, *phase, opts.threads).map(|mut k| sweep(k.as_mut(), &cands, Instant::now() + share));
        let (report, records) = conclude(&Job { key, phase: *phase, fingerprint: &fingerprint, threads: opts.threads }, &cands, measured);
        db.merge(&records)?;
        reports.push(report);
    }
    progress(jobs.len(), jobs.len(), "done");
    Ok(reports)
}

/// Workloads of `all` that `db` has no measurements of for this machine
/// and thread count.
pub fn missing(all: &[Workload], db: &Database, threads: usize) -> Vec<Workload> {
    let (tuned, _) = db.source(&HostCpu::detect().fingerprint(), threads);
    all.iter().filter(|w| !tuned.contains(&w.key())).copied().collect()
}
