//! Every native kernel against its plain reference and the interpreter, on
//! awkward sizes, random tiles, one and two threads. Integer accumulations
//! must agree exactly; float results within the budgets stated here.

use bitnet_codegen::cpu::ternary::{self, Epilogue, PackedTernary, Packing, QuantActs, Split, TernaryTiles};
use bitnet_codegen::cpu::{float, has_amx, int4, int8, ops, Isa, Pool, AMX_MIN_TOKENS};
use bitnet_ir::interp::{Interpreter, KvCache, Tensor, WeightSource};
use bitnet_ir::{quant, ActQuant, DType, Dim, GateAct, Graph, Op, TensorType};
use proptest::prelude::*;
use std::collections::HashMap;

type Weights = HashMap<String, (DType, Vec<usize>, Vec<u8>)>;

/// Float budget: |a − b| ≤ REL · Σ|terms| + ABS, for sums reordered by SIMD.
const REL: f32 = 1e-5;
const ABS: f32 = 1e-6;

fn isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.available()).collect()
}

fn tiles() -> impl Strategy<Value = TernaryTiles> {
    (
        prop::sample::select(isas()),
        prop::sample::select(TernaryTiles::ROWS.to_vec()),
        prop::sample::select(TernaryTiles::TOKENS.to_vec()),
        prop::sample::select(Split::ALL.to_vec()),
        prop::sample::select(Packing::ALL.to_vec()),
    )
        .prop_map(|(isa, rows, tokens, split, packing)| TernaryTiles { isa, rows, tokens, split, packing })
        .prop_filter("a packing the ISA has kernels for", TernaryTiles::is_valid)
}

fn acts(s: usize, k: usize, x: &[i8]) -> QuantActs {
    let mut a = QuantActs::default();
    a.resize(s, k);
    for t in 0..s {
        a.q[t * a.kp..t * a.kp + k].copy_from_slice(&x[t * k..(t + 1) * k]);
        a.sum[t] = x[t * k..(t + 1) * k].iter().map(|&v| v as i32).sum();
        a.gamma[t] = 1.0;
    }
    a
}

/// The weights (−1, 0, 1), activations and residual of a product whose
/// fast kernels must give the scalar ones' bits: each token a scale of its
/// own, so that a token's results meeting another's scale shows, and a
/// residual for every step of the epilogue, so that its vector form is held
/// to the reference's bits (rows 0, 1, 2, 3 each with one of its own).
fn bit_exact_case(n: usize, k: usize, s: usize) -> (Vec<i8>, QuantActs, Vec<f32>) {
    let w = hashed_codes(n * k, 0);
    let x: Vec<i8> = (0..s * k).map(|i| (i * 37 % 256) as i32 as i8).collect();
    let mut a = acts(s, k, &x);
    a.gamma.iter_mut().enumerate().for_each(|(t, g)| *g = 1.0 + t as f32 * 0.375);
    let residual: Vec<f32> = (0..s * n).map(|i| (i % 11) as f32 * 0.375 - 1.5).collect();
    (w, a, residual)
}

/// `len` weights (−1, 0, 1) from a multiplicative hash of their index and
/// `seed`: no period that a tile's rows could share.
fn hashed_codes(len: usize, seed: u32) -> Vec<i8> {
    (0..len).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) >> 30) as i8 % 3 - 1).collect()
}

/// Each value's bits, to compare results exactly.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn awkward() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), Just(3), Just(783), Just(2592), 1usize..300]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// With β = γ = 1 the kernel's result is the integer dot product exactly.
    #[test]
    fn ternary_dots_are_exact(
        (n, k, s) in (awkward(), awkward(), 1usize..7),
        t in tiles(),
        threads in 1usize..3,
        seed in any::<u64>(),
    ) {
        let n = n.min(300);
        let mut rng = seed;
        let mut next = move || { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (rng >> 33) as u32 };
        let w: Vec<i8> = (0..n * k).map(|_| (next() % 3) as i8 - 1).collect();
        let x: Vec<i8> = (0..s * k).map(|_| (next() % 256) as i32 as i8).collect();
        let packed = PackedTernary::pack(n, k, t.rows, t.packing, 1.0, |r, out| out.copy_from_slice(&w[r * k..(r + 1) * k]));
        let a = acts(s, k, &x);
        let mut out = vec![0f32; s * n];
        ternary::matmul(&Pool::new(threads), t, &packed, &a, &mut out, Epilogue::default());
        for tok in 0..s {
            for r in 0..n {
                let want: i32 = (0..k).map(|i| w[r * k + i] as i32 * x[tok * k + i] as i32).sum();
                prop_assert_eq!(out[tok * n + r], want as f32, "token {} row {}", tok, r);
            }
        }
    }

    /// Each packing gives back every value it was given, and repacking into
    /// the other and back (as loading does) changes no byte.
    #[test]
    fn packings_round_trip_every_value(
        (n, k) in (awkward(), awkward()),
        rows in prop::sample::select(TernaryTiles::ROWS.to_vec()),
        packing in prop::sample::select(Packing::ALL.to_vec()),
        seed in any::<u64>(),
    ) {
        let n = n.min(40);
        let mut rng = seed;
        let mut next = move || { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (rng >> 33) as u32 };
        let w: Vec<i8> = (0..n * k).map(|_| (next() % 3) as i8 - 1).collect();
        let packed = PackedTernary::pack(n, k, rows, packing, 1.0, |r, out| out.copy_from_slice(&w[r * k..(r + 1) * k]));
        let mut row = vec![7i8; k];
        for r in 0..n {
            packed.values(r, &mut row);
            prop_assert_eq!(&row[..], &w[r * k..(r + 1) * k], "row {}", r);
        }
        let other = if packing == Packing::Bits2 { Packing::Base3 } else { Packing::Bits2 };
        let again = PackedTernary::pack(n, k, rows, packing, 1.0, |r, out| out.copy_from_slice(&w[r * k..(r + 1) * k]));
        let back = again.with_packing(other).with_packing(packing);
        prop_assert_eq!(&back.data()[..], &packed.data()[..]);
    }

    /// Matrices side by side (`ternary_cat`: q, k and v) give each one's
    /// product with its scale, bit for bit, in its own columns.
    #[test]
    fn side_by_side_products_are_each_product(
        ns in prop::collection::vec(awkward(), 1..4),
        (k, s) in (awkward(), 1usize..6),
        t in tiles(),
        threads in 1usize..3,
        seed in any::<u64>(),
    ) {
        let ns: Vec<usize> = ns.into_iter().map(|n| n.min(300)).collect();
        let mut rng = seed;
        let mut next = move || { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (rng >> 33) as u32 };
        let x: Vec<i8> = (0..s * k).map(|_| (next() % 256) as i32 as i8).collect();
        let a = acts(s, k, &x);
        let packed: Vec<PackedTernary> = ns
            .iter()
            .map(|&n| {
                let w: Vec<i8> = (0..n * k).map(|_| (next() % 3) as i8 - 1).collect();
                PackedTernary::pack(n, k, t.rows, t.packing, 0.5 + (next() % 4) as f32, |r, out| out.copy_from_slice(&w[r * k..(r + 1) * k]))
            })
            .collect();
        let pool = Pool::new(threads);
        let parts: Vec<(&PackedTernary, Option<f32>)> = packed.iter().enumerate().map(|(i, p)| (p, (i % 2 == 0).then_some(1.5))).collect();
        let width: usize = ns.iter().sum();
        let mut out = vec![0f32; s * width];
        ternary::matmul_cat(&pool, t, &parts, &a, &mut out);
        let mut col = 0;
        for &(p, scale) in &parts {
            let mut one = vec![0f32; s * p.n];
            ternary::matmul(&pool, t, p, &a, &mut one, Epilogue { scale, residual: None });
            for tok in 0..s {
                prop_assert_eq!(&out[tok * width + col..][..p.n], &one[tok * p.n..][..p.n], "token {} columns from {}", tok, col);
            }
            col += p.n;
        }
    }

    /// Stored ternary formats, repacked, against the interpreter's
    /// `ternary_matmul` with its scale and a residual epilogue.
    #[test]
    fn ternary_matmul_matches_the_interpreter(
        (n, kb, s) in (prop_oneof![Just(1usize), Just(3), Just(37)], 1usize..4, 1usize..6),
        dtype in prop::sample::select(vec![DType::I2S, DType::TQ2_0, DType::TQ1_0]),
        t in tiles(),
        threads in 1usize..3,
        seed in any::<u32>(),
    ) {
        let k = kb * 256;
        let beta = 0.03125 + (seed % 7) as f32 * 0.25;
        let values: Vec<f32> = (0..n * k).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 30) as f32 % 3.0 - 1.0).map(|c| c * beta).collect();
        let x: Vec<f32> = (0..s * k).map(|i| (((i as u32).wrapping_mul(40503).wrapping_add(seed) % 2001) as f32 - 1000.0) / 250.0).collect();
        let residual: Vec<f32> = (0..s * n).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut ws = Weights::new();
        ws.insert("w".into(), (dtype, vec![n, k], quant::quantize(dtype, &values)));
        let mut g = Graph::new("t");
        let xi = g.leaf(Op::Input { name: "x".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(k)]));
        let ri = g.leaf(Op::Input { name: "r".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(n)]));
        let q = g.add(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[xi]).unwrap();
        let wv = g.leaf(Op::Weight { name: "w".into() }, TensorType::fixed(dtype, &[n, k]));
        let y = g.add(Op::TernaryMatMul(bitnet_ir::Epilogue { scale: false, residual: true }), &[q, wv, ri]).unwrap();
        g.outputs.push(y);
        let inputs = [("x", Tensor::f32(vec![s, k], x.clone())), ("r", Tensor::f32(vec![s, n], residual.clone()))];
        let want = Interpreter::new(&ws, 1).eval(&g, &inputs, &mut KvCache::new()).unwrap().pop().unwrap();
        let want = want.as_f32().unwrap();

        let packed = PackedTernary::from_weight(&ws.weight("w").unwrap(), t.rows).unwrap().with_packing(t.packing);
        let mut a = QuantActs::default();
        ops::quantize_rows(&x, k, None, &mut a);
        let mut out = vec![0f32; s * n];
        ternary::matmul(&Pool::new(threads), t, &packed, &a, &mut out, Epilogue { scale: None, residual: Some(&residual) });
        for (i, (&got, &want)) in out.iter().zip(want).enumerate() {
            // TQ blocks each multiply by β before summing; the kernel once.
            let budget = REL * (want - residual[i]).abs().max(1.0) * kb as f32 + ABS;
            prop_assert!((got - want).abs() <= budget, "{}: {} vs {}", i, got, want);
        }
    }

    /// The gate and up products with their gated unit, against the
    /// interpreter's `ternary_glu` (two `ternary_matmul`s, then `glu`).
    /// I2_S applies one β per tensor as the kernel does, so every bit
    /// must agree.
    #[test]
    fn ternary_glu_matches_the_interpreter(
        (n, kb, s) in (prop_oneof![Just(1usize), Just(3), Just(37)], 1usize..4, 1usize..6),
        act in prop::sample::select(vec![GateAct::Silu, GateAct::Relu2]),
        scaled in any::<bool>(),
        t in tiles(),
        threads in 1usize..3,
        seed in any::<u32>(),
    ) {
        let k = kb * 256;
        let values = |salt: u32, beta: f32| -> Vec<f32> {
            (0..n * k).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed ^ salt) >> 30) as f32 % 3.0 - 1.0).map(|c| c * beta).collect()
        };
        let x: Vec<f32> = (0..s * k).map(|i| (((i as u32).wrapping_mul(40503).wrapping_add(seed) % 2001) as f32 - 1000.0) / 250.0).collect();
        let mut ws = Weights::new();
        ws.insert("g".into(), (DType::I2S, vec![n, k], quant::quantize(DType::I2S, &values(1, 0.5))));
        ws.insert("u".into(), (DType::I2S, vec![n, k], quant::quantize(DType::I2S, &values(2, 0.375))));
        ws.insert("gs".into(), (DType::F32, vec![1], quant::quantize(DType::F32, &[1.25])));
        ws.insert("us".into(), (DType::F32, vec![1], quant::quantize(DType::F32, &[0.8])));
        let mut g = Graph::new("t");
        let xi = g.leaf(Op::Input { name: "x".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(k)]));
        let q = g.add(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[xi]).unwrap();
        let mut args = vec![q];
        for (w, sc) in [("g", "gs"), ("u", "us")] {
            args.push(g.leaf(Op::Weight { name: w.into() }, TensorType::fixed(DType::I2S, &[n, k])));
            if scaled {
                args.push(g.leaf(Op::Weight { name: sc.into() }, TensorType::fixed(DType::F32, &[1])));
            }
        }
        let epilogue = bitnet_ir::Epilogue { scale: scaled, residual: false };
        let y = g.add(Op::TernaryGlu { act, epilogue }, &args).unwrap();
        g.outputs.push(y);
        let inputs = [("x", Tensor::f32(vec![s, k], x.clone()))];
        let want = Interpreter::new(&ws, 1).eval(&g, &inputs, &mut KvCache::new()).unwrap().pop().unwrap();
        let want = want.as_f32().unwrap();

        let wg = PackedTernary::from_weight(&ws.weight("g").unwrap(), t.rows).unwrap().with_packing(t.packing);
        let wu = PackedTernary::from_weight(&ws.weight("u").unwrap(), t.rows).unwrap().with_packing(t.packing);
        let mut a = QuantActs::default();
        ops::quantize_rows(&x, k, None, &mut a);
        let mut out = vec![0f32; s * n];
        let (sg, su) = if scaled { (Some(1.25), Some(0.8)) } else { (None, None) };
        ternary::matmul_glu(&Pool::new(threads), t, act, (&wg, sg), (&wu, su), &a, &mut out);
        for (i, (&got, &want)) in out.iter().zip(want).enumerate() {
            prop_assert_eq!(got.to_bits(), want.to_bits(), "{}: {} vs {}", i, got, want);
        }
    }

    #[test]
    fn int8_dots_are_exact(chunks in 1usize..30, seed in any::<u32>()) {
        let n = chunks * 128;
        let a: Vec<i8> = (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 255) as i32 as i8).map(|v| v.max(-127)).collect();
        let b: Vec<i8> = (0..n).map(|i| ((i as u32).wrapping_mul(40503) ^ seed) as i8).map(|v| v.max(-127)).collect();
        for isa in isas() {
            prop_assert_eq!(int8::dot(isa, &a, &b), int8::reference_dot(&a, &b));
        }
    }

    /// The int8 head is lossy, but close: cosine with the f16 product.
    #[test]
    fn int8_head_is_close_to_the_float_one((n, k) in (prop_oneof![Just(1usize), Just(3), Just(61)], prop_oneof![Just(32usize), Just(783), Just(2592)]), threads in 1usize..3) {
        let values: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 211) as f32 / 50.0 - 2.0).collect();
        let x: Vec<f32> = (0..k).map(|i| ((i * 104729) % 173) as f32 / 40.0 - 2.0).collect();
        let bytes = quant::quantize(DType::F16, &values);
        let w = bitnet_ir::interp::WeightView { dtype: DType::F16, shape: vec![n, k], data: &bytes };
        let pool = Pool::new(threads);
        let mut want = vec![0f32; n];
        float::matmul(&pool, Isa::Scalar, &w, &x, &mut want);
        let q = int8::Int8Rows::quantize(&w);
        let mut a = QuantActs::default();
        ops::quantize_rows(&x, k, None, &mut a);
        for isa in isas() {
            let mut got = vec![0f32; n];
            int8::matmul(&pool, isa, &q, &a, &mut got);
            // Worst case: every weight and activation off by half a step.
            let amax_x = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let sum_x: f32 = x.iter().map(|v| v.abs()).sum();
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                let row = &values[r * k..(r + 1) * k];
                let amax_w = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                let sum_w: f32 = row.iter().map(|v| v.abs()).sum();
                let budget = (sum_x * amax_w + sum_w * amax_x) / 254.0 * 1.01 + 1e-3;
                prop_assert!((g - w).abs() <= budget, "{} vs {} (budget {})", g, w, budget);
            }
        }
    }

    /// The one-row 4-bit dot (Cranelift's; the others are the reference,
    /// AVX2 and AVX-512 read blocks of rows: the test below) against the
    /// plain one: the group sums are exact integers, so only the f32 sum of
    /// the scaled groups may differ.
    #[test]
    fn int4_dots_match_the_reference(groups in 1usize..96, seed in any::<u32>()) {
        let q: Vec<u8> = (0..groups * 16).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as u8).collect();
        let d: Vec<f32> = (0..groups).map(|g| ((g as u32 ^ seed) % 61) as f32 / 400.0 - 0.07).collect();
        let x: Vec<i8> = (0..groups * 32).map(|i| ((i as u32).wrapping_mul(40503) ^ seed) as i8).map(|v| v.max(-127)).collect();
        let want = int4::reference_dot(&q, &d, &x);
        let mass: f32 = d.iter().map(|v| v.abs() * 8.0 * 127.0 * 32.0).sum();
        for isa in isas() {
            let got = int4::dot(isa, &q, &d, &x);
            prop_assert!((got - want).abs() <= mass * 1e-6, "{}: {} vs {}", isa.name(), got, want);
        }
    }

    /// The 4-bit head on awkward shapes: every ISA's product equals the
    /// plain dot of the dequantized rows, and both stay within the
    /// quantization's error of the f16 product.
    #[test]
    fn int4_head_matches_its_reference_and_is_close_to_the_float_one(
        (n, k) in (prop_oneof![Just(1usize), Just(3), Just(5), Just(6), Just(61)], prop_oneof![Just(1usize), Just(3), Just(783), Just(2592)]),
        tokens in 1usize..9,
        threads in 1usize..3,
    ) {
        let values: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 211) as f32 / 50.0 - 2.0).collect();
        let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 104729) % 173) as f32 / 40.0 - 2.0).collect();
        let bytes = quant::quantize(DType::F16, &values);
        let w = bitnet_ir::interp::WeightView { dtype: DType::F16, shape: vec![n, k], data: &bytes };
        let pool = Pool::new(threads);
        let q = int4::Int4Rows::quantize(&w);
        prop_assert_eq!(q.bytes(), n * k.div_ceil(128) * 128 * 9 / 16);
        let mut a = QuantActs::default();
        ops::quantize_rows(&x, k, None, &mut a);
        for isa in isas() {
            let mut got = vec![0f32; tokens * n];
            int4::matmul(&pool, isa, &q, &a, &mut got);
            for t in 0..tokens {
                let xs = &x[t * k..(t + 1) * k];
                let xq: Vec<f32> = a.row(t)[..k].iter().map(|&v| v as f32 / a.gamma[t]).collect();
                for r in 0..n {
                    let deq = q.dequantize_row(r);
                    let reference: f32 = deq.iter().zip(&xq).map(|(w, x)| w * x).sum();
                    let mass: f32 = deq.iter().zip(&xq).map(|(w, x)| (w * x).abs()).sum();
                    let g = got[t * n + r];
                    prop_assert!((g - reference).abs() <= mass * 1e-5 + 1e-5, "{} token {} row {}: {} vs {}", isa.name(), t, r, g, reference);
                    // Against the f16 weights: half a 4-bit step a weight
                    // (a sixteenth of the group's largest), half an int8 step an activation.
                    let row = &values[r * k..(r + 1) * k];
                    let exact: f32 = row.iter().zip(xs).map(|(w, x)| w * x).sum();
                    let amax_x = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let budget: f32 = row.chunks(32).zip(xs.chunks(32)).map(|(wg, xg)| {
                        let amax_w = wg.iter().fold(0f32, |m, v| m.max(v.abs()));
                        xg.iter().map(|v| v.abs()).sum::<f32>() * amax_w / 16.0 + wg.iter().map(|v| v.abs()).sum::<f32>() * amax_x / 254.0
                    }).sum::<f32>() * 1.01 + 1e-3;
                    prop_assert!((g - exact).abs() <= budget, "{} token {} row {}: {} vs {} (budget {})", isa.name(), t, r, g, exact, budget);
                }
            }
        }
    }

    #[test]
    fn float_dots_match_the_plain_sum(k in awkward(), seed in any::<u32>()) {
        let a: Vec<f32> = (0..k).map(|i| ((i as u32 ^ seed) % 97) as f32 / 13.0 - 3.0).collect();
        let b: Vec<f32> = (0..k).map(|i| ((i as u32).wrapping_mul(31).wrapping_add(seed) % 89) as f32 / 11.0 - 4.0).collect();
        let bytes: Vec<u8> = b.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let bh: Vec<f32> = b.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let mass: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum();
        let want = float::reference_dot(&a, &b);
        let want_h = float::reference_dot(&a, &bh);
        for isa in isas() {
            prop_assert!((float::dot(isa, &a, &b) - want).abs() <= REL * mass + ABS);
            prop_assert!((float::dot_f16(isa, &a, &bytes) - want_h).abs() <= REL * mass + ABS);
            // AVX-512's f16 dot keeps AVX2's sums: a head's logits do not
            // move with the ISA.
            if isa == Isa::Avx512Vnni {
                prop_assert_eq!(float::dot_f16(isa, &a, &bytes).to_bits(), float::dot_f16(Isa::Avx2, &a, &bytes).to_bits(), "k {}", k);
            }
            let mut conv = vec![0f32; k];
            float::f16_to_f32(isa, &bytes, &mut conv);
            prop_assert_eq!(&conv, &bh);
        }
    }

    /// The head and float projections against the interpreter's matmul.
    #[test]
    fn float_matmul_matches_the_interpreter(
        (n, k, s) in (prop_oneof![Just(1usize), Just(3), Just(61)], prop_oneof![Just(1usize), Just(3), Just(32), Just(783), Just(2592)], prop_oneof![1usize..4, 4usize..14]),
        dtype in prop::sample::select(vec![DType::F16, DType::F32, DType::Q8_0, DType::Q4K, DType::Q6K]),
        threads in 1usize..3,
    ) {
        // Quantized rows are whole blocks (32 values, 256 for the k-quants).
        let k = k.div_ceil(dtype.block_elems()) * dtype.block_elems();
        let values: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 211) as f32 / 50.0 - 2.0).collect();
        let x: Vec<f32> = (0..s * k).map(|i| ((i * 104729) % 173) as f32 / 40.0 - 2.0).collect();
        let mut ws = Weights::new();
        ws.insert("w".into(), (dtype, vec![n, k], quant::quantize(dtype, &values)));
        let mut g = Graph::new("t");
        let xi = g.leaf(Op::Input { name: "x".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(k)]));
        let wv = g.leaf(Op::Weight { name: "w".into() }, TensorType::fixed(dtype, &[n, k]));
        let y = g.add(Op::MatMul, &[xi, wv]).unwrap();
        g.outputs.push(y);
        let want = Interpreter::new(&ws, 1).eval(&g, &[("x", Tensor::f32(vec![s, k], x.clone()))], &mut KvCache::new()).unwrap().pop().unwrap();
        let want = want.as_f32().unwrap();
        let w = ws.weight("w").unwrap();
        let mass: Vec<f32> = (0..s * n).map(|i| { let (t, r) = (i / n, i % n); (0..k).map(|j| (x[t * k + j] * values[r * k + j]).abs()).sum::<f32>() * 1.01 }).collect();
        for isa in isas() {
            let mut out = vec![0f32; s * n];
            float::matmul(&Pool::new(threads), isa, &w, &x, &mut out);
            for i in 0..s * n {
                prop_assert!((out[i] - want[i]).abs() <= REL * mass[i] + ABS, "{} {}: {} vs {}", isa.name(), i, out[i], want[i]);
            }
        }
    }
}

/// AVX-512's one-token f16 dot gives AVX2's bits on sizes around its
/// 32-value steps and 8-value tail, where the CPU has it.
#[test]
fn avx512_f16_dot_gives_the_avx2_bits() {
    if !Isa::Avx512Vnni.available() {
        eprintln!("skipped: this CPU has no AVX-512 VNNI");
        return;
    }
    for k in [1usize, 7, 8, 9, 31, 32, 33, 40, 63, 64, 783, 2560, 2592] {
        let a: Vec<f32> = (0..k).map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.0).collect();
        let bytes: Vec<u8> = (0..k).flat_map(|i| half::f16::from_f32(((i * 31) % 89) as f32 / 11.0 - 4.0).to_le_bytes()).collect();
        assert_eq!(float::dot_f16(Isa::Avx512Vnni, &a, &bytes).to_bits(), float::dot_f16(Isa::Avx2, &a, &bytes).to_bits(), "k {k}");
    }
}

/// Many tokens against f16 rows (the head of a batched step): panels of
/// rows, k-blocks and the lanes' tail (rows shorter than the lanes too),
/// blocks of eight and four tokens and the tokens left over, on awkward
/// sizes, against each product's plain sum; every result written.
#[test]
fn batched_f16_rows_match_their_plain_sums() {
    for (n, k) in [(1, 783), (3, 16), (50, 9), (783, 2592), (2592, 783), (61, 1040)] {
        let values: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 211) as f32 / 50.0 - 2.0).collect();
        let bytes = quant::quantize(DType::F16, &values);
        let w = bitnet_ir::interp::WeightView { dtype: DType::F16, shape: vec![n, k], data: &bytes };
        let rounded: Vec<f32> = bytes.chunks_exact(2).map(|h| half::f16::from_le_bytes([h[0], h[1]]).to_f32()).collect();
        for s in [4, 8, 9, 13] {
            let x: Vec<f32> = (0..s * k).map(|i| ((i * 104729) % 173) as f32 / 40.0 - 2.0).collect();
            for isa in isas() {
                for threads in [1, 2] {
                    let mut out = vec![f32::NAN; s * n];
                    float::matmul(&Pool::new(threads), isa, &w, &x, &mut out);
                    for (i, &got) in out.iter().enumerate() {
                        let (t, r) = (i / n, i % n);
                        let (xt, row) = (&x[t * k..(t + 1) * k], &rounded[r * k..(r + 1) * k]);
                        let want = float::reference_dot(xt, row);
                        let mass: f32 = xt.iter().zip(row).map(|(a, b)| (a * b).abs()).sum();
                        assert!((got - want).abs() <= REL * mass + ABS, "{} n={n} k={k} s={s} token {t} row {r}: {got} vs {want}", isa.name());
                    }
                }
            }
        }
    }
}

/// Blocks of arbitrary bytes (negative Q6_K scales, every code and
/// 6-bit scale) with their f16 scales set to 1/64: `n` rows of `k`.
fn arbitrary_k_quant_rows(dtype: DType, n: usize, k: usize) -> Vec<u8> {
    let (size, scales_at) = if dtype == DType::Q6K { (210, [208].as_slice()) } else { (144, [0, 2].as_slice()) };
    let mut seed = 11u64;
    let mut bytes: Vec<u8> = (0..n * k / 256 * size)
        .map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        })
        .collect();
    for block in bytes.chunks_exact_mut(size) {
        for &at in scales_at {
            block[at..at + 2].copy_from_slice(&[0x00, 0x24]);
        }
    }
    bytes
}

/// One token against k-quant rows (a GGUF's Q4_K or Q6_K head): the
/// products that dequantize in registers against the dequantized rows'
/// plain sums, on every ISA, rows of one to nine blocks, both quantized
/// and of arbitrary bytes.
#[test]
fn k_quant_rows_meet_one_token_as_their_dequantized_values() {
    for (dtype, arbitrary) in [DType::Q4K, DType::Q6K].into_iter().flat_map(|d| [(d, false), (d, true)]) {
        for k in [256, 768, 2304] {
            let n = 3;
            let values: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 211) as f32 / 50.0 - 2.0).collect();
            let x: Vec<f32> = (0..k).map(|i| ((i * 104729) % 173) as f32 / 40.0 - 2.0).collect();
            let bytes = if arbitrary { arbitrary_k_quant_rows(dtype, n, k) } else { quant::quantize(dtype, &values) };
            let w = bitnet_ir::interp::WeightView { dtype, shape: vec![n, k], data: &bytes };
            let mut row = vec![0f32; k];
            for isa in isas() {
                let mut out = vec![0f32; n];
                float::matmul(&Pool::new(2), isa, &w, &x, &mut out);
                for (r, &got) in out.iter().enumerate() {
                    w.row(r).dequantize(&mut row);
                    let want = float::reference_dot(&x, &row);
                    let mass: f32 = x.iter().zip(&row).map(|(a, b)| (a * b).abs()).sum();
                    assert!((got - want).abs() <= REL * mass + ABS, "{dtype:?} k={k} {} row {r}: {got} vs {want}", isa.name());
                }
            }
        }
    }
}

#[test]
fn differing_block_scales_are_refused_with_a_reason() {
    let mut values = vec![1.0f32; 512];
    values[300] = 2.0; // second block's scale is 2
    let ws: Weights = [("w".to_string(), (DType::TQ2_0, vec![1, 512], quant::quantize(DType::TQ2_0, &values)))].into();
    let err = PackedTernary::from_weight(&ws.weight("w").unwrap(), 1).err().unwrap();
    assert!(err.contains("--backend interp"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The row kernels of every ISA, token-parallel or not, give the
    /// interpreter's bits, whatever the thread count.
    #[test]
    fn parallel_row_kernels_equal_the_serial_ones(
        tokens in prop_oneof![Just(1usize), Just(3), Just(7)],
        k in prop_oneof![Just(8usize), Just(32), Just(784), Just(2592)],
        threads in 1usize..4,
        seed in any::<u32>(),
    ) {
        let pool = Pool::new(threads);
        let mut state = seed as u64 | 1;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
        };
        let x: Vec<f32> = (0..tokens * k).map(|_| next()).collect();
        let y: Vec<f32> = (0..tokens * k).map(|_| next()).collect();
        let w: Vec<f32> = (0..k).map(|_| next()).collect();
        // Every ISA gives the interpreter's bits, on one thread or several.
        let mut a = QuantActs::default();
        ops::quantize_rows(&x, k, Some((&w, 1e-5)), &mut a);
        // Enough values for the parallel path: repeat the rows.
        let (g, u): (Vec<f32>, Vec<f32>) = (x.iter().cycle().take(1 << 15).copied().collect(), y.iter().cycle().take(1 << 15).copied().collect());
        let positions: Vec<i32> = (0..tokens as i32).map(|p| p * 3 + 1).collect();
        let d = if k % 16 == 0 { 16 } else { 8 };
        for isa in isas() {
            let mut b = QuantActs::default();
            ops::quantize_rows_on(&pool, isa, &x, k, Some((&w, 1e-5)), &mut b);
            prop_assert!(a.q == b.q && a.gamma == b.gamma && a.sum == b.sum, "{:?}", isa);
            for act in [bitnet_ir::GateAct::Silu, bitnet_ir::GateAct::Relu2] {
                let (mut o1, mut o2) = (vec![0f32; g.len()], vec![0f32; g.len()]);
                ops::glu(act, &g, &u, &mut o1);
                ops::glu_on(&pool, isa, act, &g, &u, &mut o2);
                prop_assert_eq!(&o1, &o2, "{:?}", isa);
            }
            for op in bitnet_ir::BinaryOp::ALL {
                let mut o = vec![0f32; g.len()];
                ops::binary_on(&pool, isa, op, &g, &u, &mut o);
                let want: Vec<f32> = g.iter().zip(&u).map(|(&a, &b)| bitnet_ir::interp::kernels::binary(op, a, b)).collect();
                prop_assert_eq!(&o, &want, "{:?} {:?}", isa, op);
            }
            for mode in [bitnet_ir::RopeMode::Interleaved, bitnet_ir::RopeMode::Neox] {
                let mut o1 = x.clone();
                bitnet_ir::interp::kernels::rope(&mut o1, k, &positions, mode, 10000.0, d);
                let mut o2 = vec![0f32; x.len()];
                ops::rope_on(&pool, isa, &x, &mut o2, k, &positions, mode, 10000.0, d);
                prop_assert_eq!(&o1, &o2, "{:?}", isa);
            }
        }
    }
}

/// Every ISA's ternary kernels against the scalar ones, bit for bit: every
/// tile shape, token step, split and packing, awkward sizes, each token a
/// γ of its own; the scale and residual epilogue, side-by-side groups and
/// both gated units. Kernels for instructions this CPU
/// lacks (the AVX-512 VNNI ones, written on machines without it) skip with
/// a message; the proptests above include them too wherever the CPU has them.
#[test]
fn fast_kernels_match_the_scalar_ones_bit_for_bit() {
    for isa in [Isa::Avx2, Isa::Avx512Vnni, Isa::Cranelift] {
        if !isa.available() {
            eprintln!("skipped: this CPU has no {}", isa.name());
        }
    }
    let pool = Pool::new(2);
    // Also several calls of four tokens and the ones left over, on long
    // rows, and more pairs of tokens than the gated unit's batch.
    for (n, k, s) in [(1usize, 1usize, 1usize), (3, 783, 3), (37, 2592, 7), (300, 256, 5), (61, 3233, 8), (9, 6912, 17), (6, 130, 9), (13, 640, 37)] {
        let (w, a, residual) = bit_exact_case(n, k, s);
        let other = hashed_codes(w.len(), 1);
        let ep = Epilogue { scale: Some(0.6875), residual: Some(&residual) };
        for (rows, packing) in TernaryTiles::ROWS.into_iter().flat_map(|r| Packing::ALL.map(|p| (r, p))) {
            let pack = |w: &[i8], beta: f32| PackedTernary::pack(n, k, rows, packing, beta, |r, out| out.copy_from_slice(&w[r * k..(r + 1) * k]));
            let (packed, other) = (pack(&w, 0.3), pack(&other, 0.7));
            let parts = [(&packed, Some(0.5f32)), (&other, None), (&packed, Some(2.0))];
            let products = |t: TernaryTiles| {
                let mut out = [vec![0f32; s * n], vec![0f32; s * 3 * n], vec![0f32; s * n], vec![0f32; s * n]];
                ternary::matmul(&pool, t, &packed, &a, &mut out[0], ep);
                ternary::matmul_cat(&pool, t, &parts, &a, &mut out[1]);
                ternary::matmul_glu(&pool, t, GateAct::Silu, (&packed, None), (&other, Some(0.8125)), &a, &mut out[2]);
                ternary::matmul_glu(&pool, t, GateAct::Relu2, (&packed, Some(1.375)), (&other, None), &a, &mut out[3]);
                out
            };
            let want = products(TernaryTiles { packing, ..TernaryTiles::new(Isa::Scalar, rows, 1) });
            for isa in isas().into_iter().filter(|&i| i != Isa::Scalar) {
                for tokens in TernaryTiles::TOKENS {
                    for split in Split::ALL {
                        let t = TernaryTiles { isa, rows, tokens, split, packing };
                        if !t.is_valid() {
                            continue;
                        }
                        for (name, (got, want)) in ["matmul", "cat", "glu silu", "glu relu2"].into_iter().zip(products(t).iter().zip(&want)) {
                            assert_eq!(bits(got), bits(want), "{name} {t} n {n} k {k} tokens {s}");
                        }
                    }
                }
            }
        }
    }
}

/// One token alone (decode: its sums gathered a run of tiles at a time,
/// then finished together, sixteen rows a vector) gives the bits that the
/// same token gets in a batch (finished a kernel call's block at a time):
/// every ISA, tile shape, packing and split, one and two threads; rows
/// that span several runs and end in a partial tile; the scale and
/// residual epilogue, side-by-side groups and both gated units, with
/// scales that round.
#[test]
fn one_token_gives_its_bits_in_a_batch() {
    let pools = [Pool::new(1), Pool::new(2)];
    for (n, k) in [(1usize, 1usize), (3, 783), (65, 256), (300, 130), (783, 2592), (2, 6912)] {
        let s = 5;
        let (w, a, residual) = bit_exact_case(n, k, s);
        let other: Vec<i8> = (0..w.len()).map(|i| w[(i * 5 + 1) % w.len()]).collect();
        let shapes = TernaryTiles::ROWS.into_iter().flat_map(|r| Packing::ALL.map(|p| (r, p)));
        for ((rows, packing), isa) in shapes.flat_map(|rp| isas().into_iter().map(move |i| (rp, i))) {
            let pack = |w: &[i8], beta: f32| PackedTernary::pack(n, k, rows, packing, beta, |r, out| out.copy_from_slice(&w[r * k..(r + 1) * k]));
            let (wa, wb) = (pack(&w, 0.3), pack(&other, 0.7));
            let parts = [(&wa, Some(0.6875f32)), (&wb, None), (&wa, Some(1.375))];
            for (split, pool) in Split::ALL.into_iter().flat_map(|sp| pools.iter().map(move |p| (sp, p))) {
                let tiles = TernaryTiles { packing, split, ..TernaryTiles::new(isa, rows, 4) };
                if !tiles.is_valid() {
                    continue;
                }
                let products = |x: &QuantActs, residual: &[f32]| {
                    let tokens = x.tokens();
                    let mut out = vec![vec![0f32; tokens * n], vec![0f32; tokens * 3 * n], vec![0f32; tokens * n], vec![0f32; tokens * n]];
                    ternary::matmul(pool, tiles, &wa, x, &mut out[0], Epilogue { scale: Some(0.6875), residual: Some(residual) });
                    ternary::matmul_cat(pool, tiles, &parts, x, &mut out[1]);
                    ternary::matmul_glu(pool, tiles, GateAct::Silu, (&wa, None), (&wb, Some(0.8125)), x, &mut out[2]);
                    ternary::matmul_glu(pool, tiles, GateAct::Relu2, (&wa, Some(1.375)), (&wb, None), x, &mut out[3]);
                    out
                };
                let batch = products(&a, &residual);
                for t in [0, 3] {
                    let mut one = QuantActs::default();
                    one.resize(1, k);
                    one.q[..a.kp].copy_from_slice(&a.q[t * a.kp..(t + 1) * a.kp]);
                    (one.sum[0], one.gamma[0]) = (a.sum[t], a.gamma[t]);
                    let alone = products(&one, &residual[t * n..(t + 1) * n]);
                    for (name, (alone, batch)) in ["matmul", "cat", "glu silu", "glu relu2"].into_iter().zip(alone.iter().zip(&batch)) {
                        let width = alone.len();
                        assert_eq!(
                            bits(alone),
                            bits(&batch[t * width..(t + 1) * width]),
                            "{name} {tiles} {packing:?} threads {} n {n} k {k} token {t}",
                            pool.threads()
                        );
                    }
                }
            }
        }
    }
}

/// Sums at the edge of the 16-bit lanes that kernels add up in before
/// widening them: every weight 1 against activations all 127, −127 or
/// −128 (the quantizer's range; weight 1 is code 2, the largest), and
/// weight −1 (code 0: only `Σx` is subtracted) against 127 and −127, in
/// rows of 6912 weights (54 chunks in 2 bits, 44 in 1.6; many widenings),
/// on every ISA, tile shape and packing, one token and four: each result
/// is the exact sum, weight · activation · 6912.
#[test]
fn sums_at_the_16_bit_edge_are_exact() {
    let (n, k, pool) = (5usize, 6912usize, Pool::new(1));
    for (wv, xv) in [(1i8, 127i8), (1, -127), (1, -128), (-1, 127), (-1, -127)] {
        let want = vec![(wv as i32 * xv as i32 * k as i32) as f32; n];
        for s in [1usize, 4] {
            let a = acts(s, k, &vec![xv; s * k]);
            for (((rows, tokens), packing), isa) in TernaryTiles::ROWS
                .into_iter()
                .flat_map(|r| TernaryTiles::TOKENS.map(|t| (r, t)))
                .flat_map(|rt| Packing::ALL.map(|p| (rt, p)))
                .flat_map(|rtp| isas().into_iter().map(move |i| (rtp, i)))
            {
                let tiles = TernaryTiles { packing, ..TernaryTiles::new(isa, rows, tokens) };
                if !tiles.is_valid() {
                    continue;
                }
                let w = PackedTernary::pack(n, k, rows, packing, 1.0, |_, out| out.fill(wv));
                let mut out = vec![0f32; s * n];
                ternary::matmul(&pool, tiles, &w, &a, &mut out, Epilogue::default());
                for t in 0..s {
                    assert_eq!(out[t * n..(t + 1) * n], want[..], "{tiles} {packing:?} weights {wv} activations {xv} token {t} of {s}");
                }
            }
        }
    }
}

/// The AMX tile products (a prefill of many tokens: 2-bit weights, and
/// 1.6-bit ones whose rows are whole pairs of tile blocks, k of 640 and
/// 2560; the other 1.6-bit cases take the VNNI kernels) against the
/// scalar kernels, bit for bit: whole and partial calls of 64
/// rows, token counts past a tile's 16, groups (q, k, v) whose rows do not
/// fill a call, every tile shape and split (the tiles ignore both), one and
/// two threads.
#[test]
fn amx_products_match_the_scalar_ones_where_the_cpu_has_them() {
    if !has_amx() {
        eprintln!("skipped: this CPU or OS has no AMX-INT8");
        return;
    }
    let cases = [(1usize, 1usize, 128usize, 1usize), (3, 783, 131, 2), (37, 2592, 128, 2), (70, 256, 150, 1), (300, 640, 200, 2), (5, 2560, 131, 2)];
    for ((n, k, s, threads), packing) in cases.into_iter().flat_map(|c| [Packing::Bits2, Packing::Base3].map(|p| (c, p))) {
        assert!(s >= AMX_MIN_TOKENS, "{s} tokens would not reach the tiles, even where the rows fit them");
        let (w, a, residual) = bit_exact_case(n, k, s);
        let ep = Epilogue { scale: Some(0.6875), residual: Some(&residual) };
        let pool = Pool::new(threads);
        for rows in TernaryTiles::ROWS {
            let packed = PackedTernary::pack(n, k, rows, packing, 0.3, |r, out| out.copy_from_slice(&w[r * k..(r + 1) * k]));
            let other = PackedTernary::pack(n, k, rows, packing, 0.7, |r, out| out.iter_mut().enumerate().for_each(|(i, v)| *v = w[(r * k + i + 1) % (n * k)]));
            let parts = [(&packed, Some(0.5f32)), (&other, None), (&packed, Some(2.0))];
            let scalar = TernaryTiles { packing, ..TernaryTiles::new(Isa::Scalar, rows, 1) };
            let mut want = (vec![0f32; s * n], vec![0f32; s * 3 * n], vec![0f32; s * n]);
            ternary::matmul(&pool, scalar, &packed, &a, &mut want.0, ep);
            ternary::matmul_cat(&pool, scalar, &parts, &a, &mut want.1);
            ternary::matmul_glu(&pool, scalar, GateAct::Silu, (&packed, None), (&other, Some(0.25)), &a, &mut want.2);
            for (tokens, split) in TernaryTiles::TOKENS.into_iter().flat_map(|t| Split::ALL.map(|s| (t, s))) {
                let tiles = TernaryTiles { split, packing, ..TernaryTiles::new(Isa::Avx512Vnni, rows, tokens) };
                let mut got = (vec![0f32; s * n], vec![0f32; s * 3 * n], vec![0f32; s * n]);
                ternary::matmul(&pool, tiles, &packed, &a, &mut got.0, ep);
                ternary::matmul_cat(&pool, tiles, &parts, &a, &mut got.1);
                ternary::matmul_glu(&pool, tiles, GateAct::Silu, (&packed, None), (&other, Some(0.25)), &a, &mut got.2);
                assert_eq!(bits(&got.0), bits(&want.0), "matmul {tiles} {packing:?} n {n} k {k} tokens {s}");
                assert_eq!(bits(&got.1), bits(&want.1), "cat {tiles} {packing:?} n {n} k {k} tokens {s}");
                assert_eq!(bits(&got.2), bits(&want.2), "glu {tiles} {packing:?} n {n} k {k} tokens {s}");
            }
        }
    }
}
