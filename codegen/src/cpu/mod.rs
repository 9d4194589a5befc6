//! Native CPU kernels and the thread pool they run on.
//!
//! Each fast kernel has a plain reference next to it (`Isa::Scalar`, or a
//! `reference_*` function) that the tests compare it with on awkward sizes.
//! The instruction set is chosen when the program runs, never at build time.

pub mod blob;
pub mod float;
pub mod int8;
pub mod ops;
pub mod pool;
pub mod ternary;

pub use pool::Pool;

/// The instruction set a native kernel is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Isa {
    /// Plain Rust: the reference, and the fallback everywhere.
    Scalar,
    /// x86-64 AVX2 with FMA and F16C (256-bit vectors, `pmaddubsw`).
    Avx2,
}

impl Isa {
    pub const ALL: [Isa; 2] = [Isa::Scalar, Isa::Avx2];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
        }
    }

    pub fn from_name(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == s)
    }

    /// Whether this CPU can run it (detected at run time).
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The widest one this CPU has.
    pub fn best() -> Isa {
        if Isa::Avx2.available() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }
}
