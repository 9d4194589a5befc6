//! Kernels generated with Cranelift when the program runs, for the host as
//! `cranelift-native` sees it: every kernel family the graphs need, which
//! `Isa::Cranelift` (`--isa cranelift`) runs instead of the native ones:
//! - [`ternary`]: the ternary dot products, one function per tile shape
//!   (also an autotuner candidate beside the native kernels);
//! - [`norm_quant`]: RMSNorm, alone or with activation quantization;
//! - [`rope`]: the rotation of a token's heads;
//! - [`attention`]: one query head over its KV head's cache, softmax included;
//! - [`dot`]: f32, f16 and int8 dot products (the head, float models) and f16 rows (the embedding);
//! - [`elementwise`]: the gated units, the binary ops, softmax.
//!
//! Each says how its results compare with the interpreter's (most are
//! bit for bit). They are 128-bit vector loops; on x86-64 the native AVX2
//! kernels are 2–5× faster (`docs/performance.md`), so they stay the
//! default there. What the generated code leaves to Rust: the driver (the
//! executor walks the scheduled graph), RoPE's angles, splitting work over
//! threads, and dequantizing block-quantized float weights.
//!
//! Each kernel family is compiled once per process, on first use, into a
//! module that lives as long as the program. A host Cranelift cannot
//! target gets a clear error, and `Isa::Cranelift` is then unavailable.

pub mod attention;
pub mod dot;
pub mod elementwise;
pub mod norm_quant;
pub mod rope;
pub mod ternary;

pub use attention::AttentionJit;
pub use dot::DotJit;
pub use elementwise::ElementwiseJit;
pub use norm_quant::NormQuantJit;
pub use rope::{RopeJit, RopeTables};
pub use ternary::TernaryJit;

/// Whether every generated kernel family compiles for this host (each is
/// compiled here once, on first use).
pub fn all_available() -> Result<(), String> {
    TernaryJit::get()?;
    ElementwiseJit::get()?;
    NormQuantJit::get()?;
    DotJit::get()?;
    RopeJit::get()?;
    AttentionJit::get()?;
    Ok(())
}

use cranelift_codegen::ir::{condcodes::IntCC, types::Type, Function, InstBuilder, Signature, UserFuncName, Value};
use cranelift_codegen::isa::{OwnedTargetIsa, TargetFrontendConfig};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::JITModule;
use cranelift_module::{Linkage, Module};

/// Keeps a module's code mapped for the life of the program.
pub(crate) struct ModuleBox(#[allow(dead_code)] pub(crate) JITModule);
// SAFETY: the module is only kept so that its code stays mapped; nothing
// calls into it except through plain function pointers taken from it.
unsafe impl Send for ModuleBox {}
// SAFETY: as for Send: shared references give no access to the module.
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

/// Defines one function per `(name, signature)`, `build(i, module, func,
/// context)` writing the body of the `i`th, then finalizes the module.
/// Returns the code addresses in order.
pub(crate) fn define_all(
    module: &mut JITModule,
    fns: &[(String, Signature)],
    mut build: impl FnMut(usize, &mut JITModule, &mut Function, &mut FunctionBuilderContext),
) -> Result<Vec<*const u8>, String> {
    let mut ctx = module.make_context();
    let mut fbc = FunctionBuilderContext::new();
    let mut ids = Vec::new();
    for (i, (name, sig)) in fns.iter().enumerate() {
        let id = module.declare_function(name, Linkage::Local, sig).map_err(|e| e.to_string())?;
        ctx.func = Function::with_name_signature(UserFuncName::user(0, id.as_u32()), sig.clone());
        build(i, module, &mut ctx.func, &mut fbc);
        module.define_function(id, &mut ctx).map_err(|e| format!("{name}: {e:?}"))?;
        module.clear_context(&mut ctx);
        ids.push(id);
    }
    module.finalize_definitions().map_err(|e| e.to_string())?;
    Ok(ids.into_iter().map(|id| module.get_finalized_function(id)).collect())
}

/// `base + (i << shift)`: the address of element `i` when elements are
/// `1 << shift` bytes.
pub(crate) fn at(b: &mut FunctionBuilder, base: Value, i: Value, shift: i64) -> Value {
    let off = b.ins().ishl_imm_u(i, shift);
    b.ins().iadd(base, off)
}

/// Starts a body: the entry block, holding the function's parameters.
pub(crate) fn begin(b: &mut FunctionBuilder) -> Vec<Value> {
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    b.block_params(entry).to_vec()
}

/// Emits `i = start; while i < end (unsigned) { body(i); i += step }` and
/// returns `i` as the loop leaves it.
pub(crate) fn emit_loop(b: &mut FunctionBuilder, ptr: Type, start: Value, end: Value, step: i64, mut body: impl FnMut(&mut FunctionBuilder, Value)) -> Value {
    let (header, block, exit) = (b.create_block(), b.create_block(), b.create_block());
    b.append_block_param(header, ptr);
    b.append_block_param(exit, ptr);
    b.ins().jump(header, &[start.into()]);
    b.switch_to_block(header);
    let i = b.block_params(header)[0];
    let more = b.ins().icmp(IntCC::UnsignedLessThan, i, end);
    b.ins().brif(more, block, &[], exit, &[i.into()]);
    b.switch_to_block(block);
    body(b, i);
    let next = b.ins().iadd_imm_u(i, step);
    b.ins().jump(header, &[next.into()]);
    b.switch_to_block(exit);
    b.block_params(exit)[0]
}

/// Ends a body: return nothing, seal every block, finish.
pub(crate) fn end(mut b: FunctionBuilder, config: TargetFrontendConfig) {
    b.ins().return_(&[]);
    b.seal_all_blocks();
    b.finalize(config);
}
