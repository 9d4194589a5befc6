//! Native CPU kernels and the thread pool they run on.
//!
//! Each fast kernel has a plain reference next to it (`Isa::Scalar`, or a
//! `reference_*` function) that the tests compare it with on awkward sizes.
//! The instruction set is chosen when the program runs, never at build time.

#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
pub mod base3;
pub mod blob;
mod epilogue;
pub mod float;
pub mod int4;
pub mod int8;
pub mod jit;
pub mod lines;
pub mod ops;
pub mod pool;
pub mod ternary;
pub mod vmath;
#[cfg(target_arch = "x86_64")]
mod vnni;

pub use pool::Pool;

/// The fewest tokens whose ternary products run on AMX tiles where the
/// CPU has them ([`has_amx`]): 2-bit ones, and 1.6-bit ones whose rows are
/// whole pairs of the tiles' 64-weight blocks (2560 and 6912 are; a
/// pp128 of 2B4T in 1.6 bits went from 81-89 to 134-165 tok/s, session of
/// 2026-12-06, seventeenth). On the 2-core Intel Xeon VM of
/// docs/performance.md (session of 2026-12-06, fourteenth) 2-bit prefills of
/// 128-512 tokens ran 1.6-1.8× faster on tiles, one of 64 within the noise,
/// and fewer tokens (8 sequences' decode steps among them) slower: a call
/// unpacks its rows for all its tokens, and a `tdpbusd` took 9 ns in a bare
/// loop there and 19-35 ns fed from L1 and L2, not the 16 cycles Intel
/// gives.
pub const AMX_MIN_TOKENS: usize = 128;

/// Whether the ternary products of many tokens (a long prefill) run on
/// AMX tiles: AVX-512 VNNI's kernels, where the CPU has AMX-INT8 and the OS
/// grants it. The tests use it to say when they cover those kernels.
pub fn has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    return Isa::Avx512Vnni.available() && amx::available();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// How far ahead of its loads a decode kernel that streams its weights
/// from DRAM asks for them into L2, in bytes: far enough to cover the
/// latency of a DRAM slower than a Zen 4's. On a 2-core Intel Xeon
/// (Sapphire Rapids class) VM, 4 KB read the ternary weights 15-20% faster
/// than 1 KB (2 and 1.6 bits alike) and the f16 head 37-40 → 22-31 ms a
/// token where it had none; 8 KB was within the noise of 4 KB for the head
/// and no better for the ternary kernels (docs/performance.md, session of
/// 2026-12-06, thirteenth).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const STREAM_PREFETCH: usize = 4096;

/// How far ahead the same kernels ask for their weights into L1, in bytes:
/// by then the line is in L2 ([`STREAM_PREFETCH`] asked for it), so an L1
/// miss buffer waits on L2, not on DRAM. A core has few of those buffers
/// (16 on Intel's recent cores) and a prefetch into L1 holds one until its
/// line arrives, so one into L1 straight from DRAM left the stream short of
/// lines in flight. On the Intel VM both together read 4-6% faster than
/// 4 KB into L1 alone (the ternary products of a step, a plain sum) or
/// into L2 alone (the f16 head, which prefetched so with `prefetcht2`):
/// docs/performance.md, session of 2026-12-06, eighteenth; 2 KB into L2
/// with 512 B into L1 was slower than either. Not measured on a Zen 4,
/// whose caches may treat the two hints differently.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const STREAM_PREFETCH_L1: usize = 1024;

/// The prefetches of a kernel that streams weights read once: the `LINES`
/// cache lines [`STREAM_PREFETCH`] past `p` into L2 and those
/// [`STREAM_PREFETCH_L1`] past it into L1, where `p` is the next byte the
/// kernel reads. The ternary tile kernels, one token's f16 and q8 head
/// dots and the roofline's prefetched bandwidth sum use it. Any address is
/// harmless; off x86 it does nothing.
#[inline(always)]
pub(crate) fn prefetch_stream<const LINES: usize>(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        for line in 0..LINES {
            // SAFETY: a prefetch reads nothing and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(STREAM_PREFETCH + 64 * line) as *const i8) };
        }
        for line in 0..LINES {
            // SAFETY: as above.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(STREAM_PREFETCH_L1 + 64 * line) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The instruction set a native kernel is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Isa {
    /// Plain Rust: the reference, and the fallback everywhere.
    Scalar,
    /// x86-64 AVX2 with FMA and F16C (256-bit vectors, `pmaddubsw`).
    Avx2,
    /// AVX2, and for the ternary products and the 4-bit head AVX-512 VNNI
    /// (512-bit vectors, `vpdpbusd`), for the f16 head (one token and
    /// batched), the activations' norm and quantization and the ternary
    /// products' epilogues of one token AVX-512F; the other kernels are
    /// the AVX2 ones. Ternary products of many
    /// tokens run on AMX tiles where the CPU has them ([`has_amx`]).
    Avx512Vnni,
    /// Generated by Cranelift when the program runs (128-bit vectors):
    /// every kernel family, for any host Cranelift targets.
    Cranelift,
}

/// An ISA by its name (whether or not this CPU has it: see
/// [`Isa::require`]), or an error that lists the names.
impl std::str::FromStr for Isa {
    type Err = String;

    fn from_str(s: &str) -> Result<Isa, String> {
        bitnet_ir::names::parse_name("ISA", s, &Isa::ALL, Isa::name)
    }
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Cranelift];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Cranelift => "cranelift",
        }
    }

    /// The ISA whose kernels run everything but the ternary products:
    /// AVX-512 VNNI has ternary kernels of its own and runs AVX2's for the
    /// rest (but for those that choose AVX-512 themselves: see the variant).
    pub fn float_kernels(self) -> Isa {
        match self {
            Isa::Avx512Vnni => Isa::Avx2,
            isa => isa,
        }
    }

    pub fn from_name(s: &str) -> Option<Isa> {
        s.parse().ok()
    }

    /// Itself if this CPU can run it, else an error that says so.
    pub fn require(self) -> Result<Isa, String> {
        if self.available() {
            Ok(self)
        } else {
            Err(format!("this CPU cannot run {} kernels", self.name()))
        }
    }

    /// Whether this CPU can run it (detected at run time).
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx2.available() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
            }
            Isa::Cranelift => jit::all_available().is_ok(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The widest one this CPU has: the default of every kernel choice.
    /// AVX-512 VNNI where the CPU has it (on the AMD EPYC of
    /// docs/performance.md its ternary products prefill 1.4× and decode
    /// 1.1× faster than AVX2's, and many sequences at once 1.2×), else AVX2.
    pub fn best() -> Isa {
        [Isa::Avx512Vnni, Isa::Avx2].into_iter().find(|i| i.available()).unwrap_or(Isa::Scalar)
    }

    /// Why [`Isa::best`] chose what it did, for `inspect` and `bench`.
    pub fn best_reason() -> &'static str {
        match Isa::best() {
            Isa::Avx512Vnni => "the CPU has AVX-512 F, BW and VNNI",
            Isa::Avx2 => "the CPU has AVX2, FMA and F16C but not AVX-512 VNNI",
            _ => "the CPU lacks AVX2, FMA or F16C",
        }
    }
}
