//! Search spaces: the tile candidates of each kernel family, with the
//! validity rules of each knob. The heuristic's choice is always the first
//! candidate, so a sweep can only keep it or find something faster.

use bitnet_codegen::cpu::ternary::{Packing, Split, TernaryTiles};
use bitnet_codegen::cpu::Isa;
use bitnet_codegen::cuda::{CudaTiles, PhaseTiles};
use bitnet_codegen::schedule::{heuristic, Tiles, Workload};

/// Bumped whenever the knobs or their meaning change: records measured
/// under another version are not used.
pub const SPACE_VERSION: u32 = 4;

/// Tokens per call in the prefill phase: llama-bench's pp128 runs the
/// ternary matmuls on 128 tokens at a time, as `bitnet run` does a prompt.
pub const PREFILL_TOKENS: usize = 128;

/// Tokens per call in the batch phase: one decode step of eight sequences
/// at once (`bench --parallel 8`, a server's batch).
pub const BATCH_TOKENS: usize = 8;

/// Which use of a kernel is measured. A ternary matmul's weight layout
/// (rows per tile and packing) serves both phases; tokens per step matter
/// to prefill only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// One token: streams the weights, memory-bound.
    Decode,
    /// [`PREFILL_TOKENS`] tokens: reuses each weight tile, compute-bound.
    Prefill,
    /// [`BATCH_TOKENS`] tokens, the weights streamed as in decode: a
    /// batched step of many sequences. Measured by the calibration only,
    /// to choose the packing of engines that serve many sequences.
    Batch,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Decode => "decode",
            Phase::Prefill => "prefill",
            Phase::Batch => "batch",
        }
    }

    pub fn tokens(self) -> usize {
        match self {
            Phase::Decode => 1,
            Phase::Prefill => PREFILL_TOKENS,
            Phase::Batch => BATCH_TOKENS,
        }
    }

    /// The phases worth tuning for a workload: the float head runs on one
    /// row in both (prefill computes the last position's logits only).
    pub fn of(w: &Workload) -> &'static [Phase] {
        if w.is_ternary() {
            &[Phase::Decode, Phase::Prefill]
        } else {
            &[Phase::Decode]
        }
    }
}

/// The instruction sets this CPU runs, widest last.
fn isas() -> impl Iterator<Item = Isa> {
    Isa::ALL.into_iter().filter(|i| i.available())
}

/// Every valid candidate for `w` in `phase`, the heuristic's first.
pub fn candidates(w: &Workload, phase: Phase) -> Vec<Tiles> {
    let default = heuristic(&w.key(), Isa::best());
    let mut out = vec![default];
    let mut push = |t: Tiles| {
        if !out.contains(&t) {
            out.push(t);
        }
    };
    match (w, default) {
        (Workload::Ternary { .. }, Tiles::Ternary(d)) => {
            for isa in isas() {
                for packing in Packing::ALL {
                    for rows in TernaryTiles::ROWS {
                        match phase {
                            // Tokens per step and the split do nothing for one token.
                            Phase::Decode => push(Tiles::Ternary(TernaryTiles { isa, rows, tokens: d.tokens, split: Split::Rows, packing })),
                            Phase::Prefill | Phase::Batch => {
                                for tokens in TernaryTiles::TOKENS {
                                    Split::ALL.iter().for_each(|&split| push(Tiles::Ternary(TernaryTiles { isa, rows, tokens, split, packing })));
                                }
                            }
                        }
                    }
                }
            }
        }
        // AVX-512 VNNI runs the AVX2 float kernels: one candidate for both.
        _ => isas().filter(|&isa| isa.float_kernels() == isa).for_each(|isa| push(Tiles::Float { isa })),
    }
    out.retain(Tiles::runs_here);
    out
}

/// Every CUDA candidate of a matrix product in `phase` on a GPU of compute
/// capability `sm`, the heuristic's first. One token gains nothing from
/// more tokens per pass, so decode varies the warps (rows) per block only;
/// prefill of a ternary product also tries the tensor cores (sm_80+).
pub fn cuda_candidates(w: &Workload, phase: Phase, sm: u32) -> Vec<CudaTiles> {
    let h = PhaseTiles::heuristic(&w.key(), sm);
    let mut out = vec![if phase == Phase::Decode { h.decode } else { h.prefill }];
    let mut push = |t: CudaTiles| {
        if !out.contains(&t) {
            out.push(t);
        }
    };
    for &warps in &CudaTiles::WARPS {
        match phase {
            Phase::Decode => push(CudaTiles { warps, tokens: 1, mma: false }),
            Phase::Prefill | Phase::Batch => {
                CudaTiles::TOKENS.iter().for_each(|&tokens| push(CudaTiles { warps, tokens, mma: false }));
                if w.is_ternary() && sm >= 80 {
                    CudaTiles::MMA_TOKENS.iter().for_each(|&tokens| push(CudaTiles { warps, tokens, mma: true }));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heuristic_comes_first_and_nothing_twice() {
        for w in [Workload::Ternary { n: 640, k: 2560 }, Workload::Float { n: 300, k: 256, dtype: bitnet_ir::DType::F16 }] {
            for &phase in Phase::of(&w) {
                let c = candidates(&w, phase);
                assert_eq!(c[0], heuristic(&w.key(), Isa::best()));
                assert!(c.iter().enumerate().all(|(i, t)| !c[..i].contains(t)));
            }
        }
        // Every ISA reads the 2-bit packing; not every one the 1.6-bit one.
        let layouts: usize =
            isas().map(|isa| Packing::ALL.iter().filter(|&&packing| TernaryTiles { packing, ..TernaryTiles::new(isa, 1, 1) }.is_valid()).count()).sum();
        assert!(layouts > isas().count());
        assert_eq!(candidates(&Workload::Ternary { n: 1, k: 1 }, Phase::Decode).len(), layouts * 3);
        assert_eq!(candidates(&Workload::Ternary { n: 1, k: 1 }, Phase::Prefill).len(), layouts * 18);
    }

    #[test]
    fn cuda_candidates_start_with_the_heuristic_and_are_all_valid() {
        let (w, head) = (Workload::Ternary { n: 2560, k: 6912 }, Workload::Float { n: 300, k: 256, dtype: bitnet_ir::DType::F16 });
        for phase in [Phase::Decode, Phase::Prefill] {
            for sm in [75, 90] {
                let c = cuda_candidates(&w, phase, sm);
                let h = PhaseTiles::heuristic(&w.key(), sm);
                assert_eq!(c[0], if phase == Phase::Decode { h.decode } else { h.prefill });
                assert!(c.iter().all(CudaTiles::is_valid) && c.iter().enumerate().all(|(i, t)| !c[..i].contains(t)));
            }
        }
        assert_eq!(cuda_candidates(&w, Phase::Decode, 90).len(), 5);
        assert_eq!(cuda_candidates(&w, Phase::Prefill, 90).len(), 16 + 12);
        assert_eq!(cuda_candidates(&w, Phase::Prefill, 75).len(), 16);
        assert!(cuda_candidates(&head, Phase::Prefill, 90).iter().all(|t| !t.mma));
    }
}
