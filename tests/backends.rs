//! The compiled backend against the reference interpreter, end to end:
//! every ternary format and both FFN activations, stories260K, one and two
//! threads. Logits agree within a float budget: the head's and
//! attention's dot products are summed in another order, and TQ blocks
//! scale once per row instead of once per block. Each activation is then
//! quantized to int8, where a last-bit difference can move a value across
//! a rounding boundary: one code in 127 changes, which the next layers
//! carry to about 1e-3 of the largest logit. A wrong kernel misses by far
//! more. Greedy tokens agree exactly; thread count changes nothing at all.
//! All of it holds for each CPU instruction set: the native AVX2 kernels,
//! the scalar ones, and the kernels Cranelift generates (`--isa cranelift`).

mod common;

use bitnet_codegen::cpu::ternary::Packing;
use bitnet_codegen::cpu::Isa;
use bitnet_codegen::schedule::{HeadQuant, Pinned};
use bitnet_frontends::arch::Activation;
use bitnet_frontends::synth::{SynthShape, SynthSpec};
use bitnet_ir::DType;
use bitnet_runtime::{BackendKind as Backend, LoadOptions, Session};
use common::*;
use std::path::Path;

fn load(path: &Path, backend: Backend, threads: usize) -> Session {
    Session::load(path, &LoadOptions { threads, backend, ..Default::default() }).unwrap()
}

fn load_isa(path: &Path, isa: Isa, threads: usize) -> Session {
    let pinned = Pinned { isa: Some(isa), ..Default::default() };
    Session::load(path, &LoadOptions { threads, backend: Backend::Compiled, pinned, ..Default::default() }).unwrap()
}

fn isas() -> impl Iterator<Item = Isa> {
    Isa::ALL.into_iter().filter(|i| i.available())
}

/// Largest difference of any logit from the interpreter's, relative to the
/// largest logit (see the module's note).
const LOGIT_BUDGET: f32 = 3e-3;

fn compare(path: &Path, prompt: &[u32]) {
    let mut interp = load(path, Backend::Interp, 2);
    let want = interp.eval(prompt, true).unwrap();
    let next = [7u32];
    let want_next = interp.eval(&next, false).unwrap();
    let want_tokens = greedy(&mut interp, prompt, 12);
    for isa in isas() {
        let at = format!("{} ({})", path.display(), isa.name());
        let mut one = load_isa(path, isa, 1);
        let mut two = load_isa(path, isa, 2);
        assert!(one.schedule().unwrap().to_string().contains(&format!("isa={}", isa.name())), "{at}");
        let got = one.eval(prompt, true).unwrap();
        assert_eq!(got, two.eval(prompt, true).unwrap(), "{at}: results depend on the thread count");
        let (d, c) = (rel_diff(&got, &want), cosine(&got, &want));
        assert!(d < LOGIT_BUDGET && c > 0.99999, "{at}: logits differ: max rel diff {d}, cosine {c}");
        // Decode after prefill, through the KV cache.
        assert!(rel_diff(&one.eval(&next, false).unwrap(), &want_next) < LOGIT_BUDGET, "{at}: decode step differs");
        assert_eq!(greedy(&mut one, prompt, 12), want_tokens, "{at}: greedy tokens differ");
    }
}

#[test]
fn synthetic_models_in_every_ternary_format_agree() {
    let dir = tmp_dir("backends");
    each_small_ternary_model(&dir, |path| compare(path, &[1, 17, 42, 99, 3, 250, 8]));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn stories260k_agrees() {
    compare(&stories(), &[1, 403, 407, 261, 378]);
}

/// A float head of a few MiB is copied out of the file into memory of its
/// own (huge pages, on Linux) and read from there, by the product and by
/// the embedding lookups of a tied table alike: the same logits and tokens
/// as the interpreter's, which reads the file.
#[test]
fn a_head_copied_out_of_the_file_agrees() {
    let dir = tmp_dir("backends-copied-head");
    let path = dir.join("wide-vocabulary.gguf");
    let small = small_spec(DType::I2S, Activation::Silu);
    let spec = SynthSpec { shape: SynthShape { vocab: 4200, ..small.shape }, ..small };
    write_synth(&spec, &path);
    let head = 4200 * spec.shape.hidden * 2;
    let s = load(&path, Backend::Compiled, 2);
    let prepared = s.with_backend(|b| b.as_compiled().map(|c| c.prepared_bytes)).expect("compiled");
    assert_eq!(prepared >= head, bitnet_codegen::cpu::blob::HUGE_PAGES, "{prepared} bytes prepared, the head {head}");
    compare(&path, &[1, 17, 4100, 99, 3, 4199, 8]);
}

/// The 1.6-bit packing is lossless: its integer dot products are the
/// 2-bit packing's, so every logit is the same, bit for bit, on every ISA
/// that reads it (prefill from unpacked codes, decode from packed bytes).
#[test]
fn both_packings_give_the_same_logits() {
    let dir = tmp_dir("backends-packing");
    let check = |path: &Path, prompt: &[u32]| {
        for isa in isas() {
            let load = |packing| {
                let pinned = Pinned { isa: Some(isa), packing: Some(packing), ..Default::default() };
                Session::load(path, &LoadOptions { threads: 2, backend: Backend::Compiled, pinned, ..Default::default() })
            };
            let at = format!("{} ({})", path.display(), isa.name());
            let mut two = load(Packing::Bits2).unwrap();
            let mut base3 = match load(Packing::Base3) {
                Ok(s) => s,
                Err(e) => {
                    assert_eq!(isa, Isa::Cranelift, "{at}: {e}");
                    assert!(e.to_string().contains("1.6bit weights need avx2, avx512vnni or scalar"), "{at}: {e}");
                    continue;
                }
            };
            assert!(base3.schedule().unwrap().to_string().contains("packing=1.6bit"), "{at}");
            assert_eq!(base3.with_backend(|b| b.as_compiled().map(|c| c.weight_layout())), Some("1.6bit"), "{at}");
            assert_eq!(two.eval(prompt, true).unwrap(), base3.eval(prompt, true).unwrap(), "{at}: prefill");
            assert_eq!(two.eval(&[7], false).unwrap(), base3.eval(&[7], false).unwrap(), "{at}: decode");
        }
    };
    each_small_ternary_model(&dir, |path| check(path, &[1, 17, 42, 99, 3, 250, 8]));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn the_compiled_graph_is_fused_and_scheduled() {
    let dir = tmp_dir("backends-graph");
    let path = dir.join("m.gguf");
    write_synth(&small_spec(DType::I2S, Activation::Relu2), &path);
    let s = load(&path, Backend::Compiled, 1);
    let text = s.graph_text();
    assert!(text.contains("rms_norm_quant") && text.contains("ternary_glu") && text.contains("epilogue=residual"), "{text}");
    assert!(text.contains("ternary_cat") && text.contains("slice"), "{text}");
    // Seven projections per layer: q, k and v as one product, gate and up
    // as one, o, down; and the head.
    let schedule = s.schedule().unwrap();
    assert_eq!(schedule.steps.len(), 3 * 4 + 1, "{schedule}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn compile_dumps_the_graph_after_each_pass() {
    let dir = tmp_dir("backends-dump");
    let path = dir.join("m.gguf");
    write_synth(&small_spec(DType::TQ2_0, Activation::Relu2), &path);
    let m = path.to_str().unwrap();
    let mut sizes = Vec::new();
    for pass in bitnet_ir::passes::names() {
        let o = bitnet(&["compile", "-m", m, "--dump-after", pass]);
        assert!(o.status.success(), "{pass}: {}", stderr(&o));
        let g = bitnet_ir::parse(&stdout(&o)).unwrap_or_else(|e| panic!("{pass}: the dump does not parse: {e}"));
        sizes.push(g.nodes.len());
    }
    // Fusing shrinks this graph; fuse-projections then adds, per layer, a
    // ternary_cat and three slices in place of three products.
    assert!(sizes[..3].windows(2).all(|w| w[1] <= w[0]) && sizes[2] < sizes[0], "fusing shrinks this graph: {sizes:?}");
    assert_eq!(sizes[3], sizes[2] + 3, "{sizes:?}");
    let o = bitnet(&["compile", "-m", m, "--dump-after", "schedule"]);
    assert!(stdout(&o).contains("(heuristic)"), "{}", stdout(&o));
    let o = bitnet(&["compile", "-m", m, "--dump-after", "nope"]);
    assert!(!o.status.success() && stderr(&o).contains("canonicalize, specialize-ternary, fuse, fuse-projections"), "{}", stderr(&o));
    std::fs::remove_dir_all(dir).ok();
}

/// `--head q8` and `--head q4`: the head quantized at load (int8 per row;
/// 4-bit groups of 32). Lossy, so the check is agreement, not equality:
/// cosine with the stored head's logits at every position, on every ISA.
#[test]
fn the_quantized_heads_agree_with_the_stored_one() {
    let dir = tmp_dir("backends-quantized-head");
    let path = dir.join("m.gguf");
    write_synth(&small_spec(DType::I2S, Activation::Relu2), &path);
    for (head, tiles, min_cosine) in [(HeadQuant::Q8, "weights=int8", 0.999), (HeadQuant::Q4, "weights=int4", 0.99)] {
        for (p, isa) in [path.as_path(), stories().as_path()].into_iter().flat_map(|p| isas().map(move |i| (p, i))) {
            let opts = LoadOptions { threads: 2, pinned: Pinned { head, isa: Some(isa), ..Default::default() }, ..Default::default() };
            let mut quantized = Session::load(p, &opts).unwrap();
            assert!(quantized.schedule().unwrap().to_string().contains(tiles));
            assert_eq!(quantized.schedule().unwrap().head(), head);
            let mut stored = load(p, Backend::Compiled, 2);
            let prompt = [1u32, 203, 207, 261, 278, 17, 42];
            let (a, b) = (quantized.eval(&prompt, true).unwrap(), stored.eval(&prompt, true).unwrap());
            let v = stored.vocab();
            for (i, (ra, rb)) in a.chunks(v).zip(b.chunks(v)).enumerate() {
                let c = cosine(ra, rb);
                assert!(c >= min_cosine, "{} {}: position {i}: cosine {c}", head.name(), p.display());
                assert!(c < 1.0 - 1e-9 || head == HeadQuant::Q8, "{}: the 4-bit head changed nothing", p.display());
            }
        }
    }
    std::fs::remove_dir_all(dir).ok();
}
