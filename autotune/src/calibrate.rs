//! The calibration each machine gets once: which instruction set and which
//! ternary packing run a decode product fastest here, so that a fresh
//! tuning database already gives every ternary product the machine's best
//! (AVX-512 VNNI is not always faster than AVX2, nor 1.6 bits than 2: it
//! depends on the bandwidth each core gets). It is an autotune job like
//! any other, only smaller: 2B4T's down projection (`[2560, 6912]`) in
//! decode, the default tiles of each native ISA in each packing, checked
//! against the reference, then timed for [`BUDGET`]; its records join the
//! database under [`key`], apart from the real workloads'.

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

/// Equal but for tokens per step, which one token does not use.
fn same(a: &Tiles, b: &Tiles) -> bool {
    matches!((a, b), (Tiles::Ternary(a), Tiles::Ternary(b)) if TernaryTiles { tokens: 1, ..*a } == TernaryTiles { tokens: 1, ..*b })
}

/// Measures the candidates with `threads` workers and keeps the records in
/// `db`; the choice they make, if any was timed.
pub fn calibrate(db: &Database, threads: usize) -> Result<Option<Tiles>, String> {
    let fingerprint = HostCpu::detect().fingerprint();
    let cands = candidates();
    let measured = kernel(&PROBE, Phase::Decode, threads).map(|mut k| {
        let mut measured = sweep(k.as_mut(), &cands, Instant::now() + BUDGET);
        // The packing decides the most (see `db::LAYOUT_MARGIN`), and a
        // sweep keeps two runs of those it drops: every candidate timed
        // side by side again (a few milliseconds in all).
        let finalists: Vec<usize> = (0..measured.len()).filter(|&i| measured[i].ns().is_some()).collect();
        rematch(k.as_mut(), &mut measured, &finalists, REMATCH_ROUNDS);
        measured
    });
    let (report, records) = conclude(&Job { key: key(), phase: Phase::Decode, fingerprint: &fingerprint, threads }, &cands, measured);
    if let Some(why) = report.skipped {
        return Err(why);
    }
    db.merge(&records)?;
    // The choice as the database reads it back (the packing's margin applied).
    Ok(Tuned::new(records, &fingerprint, threads).ternary_default().map(Tiles::Ternary))
}
