//! The calibration each machine gets once: which instruction set and which
//! ternary packing run a decode product fastest here, so that a fresh
//! tuning database already gives every ternary product the machine's best
//! (AVX-512 VNNI is not always faster than AVX2, nor 1.6 bits than 2: it
//! depends on the bandwidth each core gets). It is an autotune job like
//! any other, only smaller: 2B4T's down projection (`[2560, 6912]`) in
//! decode, the default tiles of each native ISA in each packing, checked
//! against the reference, then timed for [`BUDGET`]; its records join the
//! database under [`key`], apart from the real workloads'.
//!
//! The same product on eight tokens at once ([`Phase::Batch`], one step of
//! eight sequences) is timed too, in each packing on the best ISA: it is
//! compute-bound, where 1.6 bits' fewer bytes do not help and their
//! unpacking costs, so an engine that serves many sequences may want the
//! other packing ([`crate::Tuned::for_batches`]).

use crate::db::{Database, Tuned};
use crate::harness::{rematch, sweep};
use crate::kernels::kernel;
use crate::space::Phase;
use crate::tune::{conclude, Job};
use bitnet_codegen::cpu::ternary::{Packing, TernaryTiles};
use bitnet_codegen::cpu::Isa;
use bitnet_codegen::schedule::{heuristic, ternary_heuristic, TileSource, Tiles, Workload, WorkloadKey};
use bitnet_codegen::target::HostCpu;
use std::time::{Duration, Instant};

/// The product timed.
pub const PROBE: Workload = Workload::Ternary { n: 2560, k: 6912 };

/// Time for the measurements (the reference and the packing come first).
pub const BUDGET: Duration = Duration::from_millis(400);

/// Time for the batch phase's measurements (a run is about a millisecond).
pub const BATCH_BUDGET: Duration = Duration::from_millis(150);

/// Runs each candidate gets after the sweep (a decode product is a
/// fraction of a millisecond).
const REMATCH_ROUNDS: usize = 12;

/// The key the calibration's records are kept under.
pub fn key() -> WorkloadKey {
    WorkloadKey(format!("calibration {}", PROBE.key()))
}

/// The heuristic's tiles first, then those of each native ISA this CPU has
/// in each packing.
pub fn candidates() -> Vec<Tiles> {
    let mut out = vec![heuristic(&PROBE.key(), Isa::best())];
    for isa in [Isa::Avx512Vnni, Isa::Avx2] {
        for packing in Packing::ALL {
            let t = Tiles::Ternary(TernaryTiles { packing, tokens: 1, ..ternary_heuristic(isa) });
            if t.runs_here() && !out.iter().any(|o| same(o, &t)) {
                out.push(t);
            }
        }
    }
    out
}

/// The batch phase's candidates: the default tiles of the best ISA in each
/// packing it reads (none to compare where it reads one only).
pub fn batch_candidates() -> Vec<Tiles> {
    let out: Vec<Tiles> =
        Packing::ALL.into_iter().map(|packing| Tiles::Ternary(TernaryTiles { packing, ..ternary_heuristic(Isa::best()) })).filter(Tiles::runs_here).collect();
    if out.len() > 1 {
        out
    } else {
        Vec::new()
    }
}

/// Equal but for tokens per step, which one token does not use.
fn same(a: &Tiles, b: &Tiles) -> bool {
    matches!((a, b), (Tiles::Ternary(a), Tiles::Ternary(b)) if TernaryTiles { tokens: 1, ..*a } == TernaryTiles { tokens: 1, ..*b })
}

/// What a calibration chose: the ISA and packing of one token's products,
/// and of a batched step's where it measured them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub decode: TernaryTiles,
    pub batch: Option<TernaryTiles>,
}

/// Measures the candidates with `threads` workers and keeps the records in
/// `db`; the choice they make, if any was timed.
pub fn calibrate(db: &Database, threads: usize) -> Result<Option<Choice>, String> {
    let fingerprint = HostCpu::detect().fingerprint();
    let mut records = Vec::new();
    for (phase, cands, budget) in [(Phase::Decode, candidates(), BUDGET), (Phase::Batch, batch_candidates(), BATCH_BUDGET)] {
        if cands.is_empty() {
            continue;
        }
        let measured = kernel(&PROBE, phase, threads).map(|mut k| {
            let mut measured = sweep(k.as_mut(), &cands, Instant::now() + budget);
            // The packing decides the most (see `db::LAYOUT_MARGIN`), and a
            // sweep keeps two runs of those it drops: every candidate timed
            // side by side again (a few milliseconds in all).
            let finalists: Vec<usize> = (0..measured.len()).filter(|&i| measured[i].ns().is_some()).collect();
            rematch(k.as_mut(), &mut measured, &finalists, REMATCH_ROUNDS);
            measured
        });
        let (report, mine) = conclude(&Job { key: key(), phase, fingerprint: &fingerprint, threads }, &cands, measured);
        if let Some(why) = report.skipped {
            return Err(why);
        }
        records.extend(mine);
    }
    db.merge(&records)?;
    // The choice as the database reads it back (the packing's margin applied).
    let tuned = Tuned::new(records, &fingerprint, threads);
    Ok(tuned.ternary_default().map(|decode| Choice { decode, batch: tuned.batch_default() }))
}
