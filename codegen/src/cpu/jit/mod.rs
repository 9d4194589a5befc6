//! Kernels generated with Cranelift when the program runs, for the host as
//! `cranelift-native` sees it: the ternary dot products ([`ternary`], an
//! autotuner candidate beside the native ones), the FFN's gated activation
//! ([`elementwise`]) and RMSNorm with activation quantization
//! ([`norm_quant`]). The last two give the interpreter's bits exactly but
//! run 2–3.6× slower than the native kernels here (scalar f64 sums, a call
//! per `exp`, 128-bit vectors; `cargo bench -p bitnet-codegen --bench
//! kernels -- elementwise`), so the executor keeps the native ones.
//!
//! Each kernel family is compiled once per process, on first use, into a
//! module that lives as long as the program. A host Cranelift cannot
//! target gets a clear error, and the callers fall back to native code.

pub mod elementwise;
pub mod norm_quant;
pub mod ternary;

pub use elementwise::GluJit;
pub use norm_quant::NormQuantJit;
pub use ternary::TernaryJit;

use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_jit::JITModule;

/// Keeps a module's code mapped for the life of the program.
pub(crate) struct ModuleBox(#[allow(dead_code)] pub(crate) JITModule);
// SAFETY: the module is only kept so that its code stays mapped; nothing
// calls into it except through plain function pointers taken from it.
unsafe impl Send for ModuleBox {}
unsafe impl Sync for ModuleBox {}

/// The host as Cranelift sees it, optimizing for speed.
pub(crate) fn host_isa() -> Result<OwnedTargetIsa, String> {
    let mut flags = settings::builder();
    for (k, v) in [("opt_level", "speed"), ("is_pic", "false"), ("use_colocated_libcalls", "false")] {
        flags.set(k, v).map_err(|e| format!("cranelift flag {k}: {e}"))?;
    }
    let builder = cranelift_native::builder().map_err(|e| format!("Cranelift does not support this host: {e}"))?;
    builder.finish(settings::Flags::new(flags)).map_err(|e| format!("Cranelift: {e}"))
}
