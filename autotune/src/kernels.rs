//! The real kernels as [`Kernel`]s: each workload gets random weights of
//! its shape, a reference result from the interpreter (a one-op graph), and
//! enough copies of the weights that a decode run reads them from memory,
//! as it does in a model, not from a cache warmed by the previous run.

use crate::harness::Kernel;
use crate::space::Phase;
use bitnet_codegen::cpu::blob::Blob;
use bitnet_codegen::cpu::ternary::{self, Epilogue, PackedTernary, Packing, QuantActs};
use bitnet_codegen::cpu::{float, ops, Pool};
use bitnet_codegen::schedule::{Tiles, Workload};
use bitnet_codegen::target::HostCpu;
use bitnet_ir::interp::{Interpreter, KvCache, Tensor, WeightSource, WeightView};
use bitnet_ir::{quant, ActQuant, DType, Dim, Graph, Op, TensorType};
use std::collections::HashMap;

/// Tokens in the correctness check: odd, so partial token tiles run.
const CHECK_TOKENS: usize = 3;

/// Float budget of a check: the interpreter and the kernels sum in
/// different orders. A wrong kernel misses by far more.
const REL: f32 = 1e-4;

type Weights = HashMap<String, (DType, Vec<usize>, Vec<u8>)>;

/// A deterministic stream of pseudo-random numbers, for tuning inputs.
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn unit(&mut self) -> f32 {
        self.next_u32() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
    }
}

/// Bytes a decode run must stream so that no copy is still cached from
/// its last run: twice the last-level cache.
fn cold_bytes() -> usize {
    let llc = HostCpu::detect().caches.last().and_then(|c| parse_size(c.split(' ').nth(1)?)).unwrap_or(32 << 20);
    2 * llc
}

fn parse_size(s: &str) -> Option<usize> {
    let (num, mul) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<usize>().ok().map(|n| n * mul)
}

/// The interpreter's result of one op on `x` (`[s, k]`) and weight `w`.
fn reference(ws: &Weights, dtype: DType, n: usize, k: usize, x: &[f32], ternary: bool) -> Result<Vec<f32>, String> {
    let s = x.len() / k;
    let mut g = Graph::new("tune");
    let xi = g.leaf(Op::Input { name: "x".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(k)]));
    let wv = g.leaf(Op::Weight { name: "w".into() }, TensorType::fixed(dtype, &[n, k]));
    let y = if ternary {
        let q = g.add(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[xi]).map_err(|e| e.to_string())?;
        g.add(Op::TernaryMatMul(bitnet_ir::Epilogue::default()), &[q, wv])
    } else {
        g.add(Op::MatMul, &[xi, wv])
    }
    .map_err(|e| e.to_string())?;
    g.outputs.push(y);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let out = Interpreter::new(ws, threads).eval(&g, &[("x", Tensor::f32(vec![s, k], x.to_vec()))], &mut KvCache::new()).map_err(|e| e.0)?;
    out.last().and_then(|t| t.as_f32()).map(<[f32]>::to_vec).ok_or_else(|| "the reference produced no f32 result".into())
}

fn compare(got: &[f32], want: &[f32]) -> Result<(), String> {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    match got.iter().zip(want).position(|(g, w)| (g - w).abs() > REL * scale || g.is_nan()) {
        Some(i) => Err(format!("element {i}: {} where the interpreter gives {}", got[i], want[i])),
        None if got.len() != want.len() => Err(format!("{} results, the interpreter gives {}", got.len(), want.len())),
        None => Ok(()),
    }
}

/// A ternary matmul `[s, k] × [n, k]ᵀ` in one phase.
pub struct TernaryKernel {
    n: usize,
    k: usize,
    pool: Pool,
    weights: Weights,
    check_x: Vec<f32>,
    want: Vec<f32>,
    /// Timed activations.
    acts: QuantActs,
    out: Vec<f32>,
    /// Copies of the packed weights, per layout (rows per tile, packing).
    copies: HashMap<(usize, Packing), Vec<PackedTernary>>,
    n_copies: usize,
    next: usize,
}

impl TernaryKernel {
    pub fn new(n: usize, k: usize, phase: Phase, threads: usize) -> Result<TernaryKernel, String> {
        let mut rng = Lcg(0x5eed ^ (n * 31 + k) as u64);
        let codes: Vec<i8> = (0..n * k).map(|_| (rng.next_u32() % 3) as i8 - 1).collect();
        let mut weights = Weights::new();
        weights.insert("w".into(), (DType::I2S, vec![n, k], quant::pack_i2s_rows(&codes, k, 0.5)));
        let check_x: Vec<f32> = (0..CHECK_TOKENS * k).map(|_| rng.unit() * 4.0).collect();
        let want = reference(&weights, DType::I2S, n, k, &check_x, true)?;
        let x: Vec<f32> = (0..phase.tokens() * k).map(|_| rng.unit() * 4.0).collect();
        let mut acts = QuantActs::default();
        ops::quantize_rows(&x, k, None, &mut acts);
        // Bytes of the smaller packing (1.6 bits a weight): the copies of either exceed the caches.
        let packed_bytes = n * k / 5;
        let n_copies = match phase {
            // A batched step streams the weights from memory as decode does.
            Phase::Decode | Phase::Batch => cold_bytes().div_ceil(packed_bytes).clamp(1, 64),
            Phase::Prefill => 1,
        };
        let out = vec![0f32; phase.tokens() * n];
        Ok(TernaryKernel { n, k, pool: Pool::new(threads), weights, check_x, want, acts, out, copies: HashMap::new(), n_copies, next: 0 })
    }

    /// Packs the weights for `rows` per tile in `packing`, once.
    fn pack(&mut self, rows: usize, packing: Packing) -> Result<(), String> {
        if !self.copies.contains_key(&(rows, packing)) {
            let view = self.weights.weight("w").expect("inserted in new");
            let first = PackedTernary::from_weight(&view, rows)?.with_packing(packing);
            let mut all = Vec::with_capacity(self.n_copies);
            for _ in 1..self.n_copies {
                all.push(PackedTernary::from_parts(self.n, self.k, rows, packing, first.scale, Blob::from(first.data().to_vec()))?);
            }
            all.push(first);
            self.copies.insert((rows, packing), all);
        }
        Ok(())
    }
}

impl Kernel for TernaryKernel {
    fn check(&mut self, tiles: &Tiles) -> Result<(), String> {
        let Tiles::Ternary(t) = *tiles else { return Err(format!("{tiles} are not ternary tiles")) };
        let mut x = QuantActs::default();
        ops::quantize_rows(&self.check_x, self.k, None, &mut x);
        let mut got = vec![0f32; CHECK_TOKENS * self.n];
        self.pack(t.rows, t.packing)?;
        ternary::matmul(&self.pool, t, &self.copies[&(t.rows, t.packing)][0], &x, &mut got, Epilogue::default());
        compare(&got, &self.want)
    }

    fn run(&mut self, tiles: &Tiles) {
        let Tiles::Ternary(t) = *tiles else { return };
        let i = self.next % self.n_copies;
        self.next += 1;
        if self.pack(t.rows, t.packing).is_ok() {
            let w = &self.copies[&(t.rows, t.packing)][i];
            ternary::matmul(&self.pool, t, w, &self.acts, &mut self.out, Epilogue::default());
        }
    }
}

/// A float matmul (the output head) on one token.
pub struct FloatKernel {
    n: usize,
    dtype: DType,
    pool: Pool,
    weights: Weights,
    check_x: Vec<f32>,
    want: Vec<f32>,
    x: Vec<f32>,
    out: Vec<f32>,
}

impl FloatKernel {
    pub fn new(n: usize, k: usize, dtype: DType, threads: usize) -> Result<FloatKernel, String> {
        if !dtype.is_float() || dtype.bytes_for(n * k).is_none() || !k.is_multiple_of(dtype.block_elems()) {
            return Err(format!("{dtype} [{n}, {k}] cannot be generated for tuning"));
        }
        let mut rng = Lcg(0xf10a7 ^ (n * 31 + k) as u64);
        let values: Vec<f32> = (0..n * k).map(|_| rng.unit() * 0.05).collect();
        let mut weights = Weights::new();
        weights.insert("w".into(), (dtype, vec![n, k], quant::quantize(dtype, &values)));
        drop(values);
        let check_x: Vec<f32> = (0..k).map(|_| rng.unit()).collect();
        let want = reference(&weights, dtype, n, k, &check_x, false)?;
        let x: Vec<f32> = (0..k).map(|_| rng.unit()).collect();
        Ok(FloatKernel { n, dtype, pool: Pool::new(threads), weights, check_x, want, x, out: vec![0f32; n] })
    }

    fn view(&self) -> WeightView<'_> {
        let (_, shape, data) = &self.weights["w"];
        WeightView { dtype: self.dtype, shape: shape.clone(), data }
    }
}

impl Kernel for FloatKernel {
    fn check(&mut self, tiles: &Tiles) -> Result<(), String> {
        let Tiles::Float { isa } = *tiles else { return Err(format!("{tiles} are not float tiles")) };
        let mut got = vec![0f32; self.n];
        float::matmul(&self.pool, isa, &self.view(), &self.check_x, &mut got);
        compare(&got, &self.want)
    }

    fn run(&mut self, tiles: &Tiles) {
        let Tiles::Float { isa } = *tiles else { return };
        let mut out = std::mem::take(&mut self.out);
        float::matmul(&self.pool, isa, &self.view(), &self.x, &mut out);
        self.out = out;
    }
}

/// The kernel of a workload in a phase, ready to sweep.
pub fn kernel(w: &Workload, phase: Phase, threads: usize) -> Result<Box<dyn Kernel>, String> {
    Ok(match *w {
        Workload::Ternary { n, k } => Box::new(TernaryKernel::new(n, k, phase, threads)?),
        Workload::Float { n, k, dtype } => Box::new(FloatKernel::new(n, k, dtype, threads)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::{best, sweep};
    use crate::space::candidates;
    use std::time::{Duration, Instant};

    #[test]
    fn every_candidate_passes_its_check_on_awkward_sizes() {
        for (n, k) in [(1, 128), (3, 256), (783, 128), (2592, 256)] {
            for phase in [Phase::Decode, Phase::Prefill] {
                let w = Workload::Ternary { n, k };
                let mut kern = kernel(&w, phase, 2).unwrap();
                let ms = sweep(kern.as_mut(), &candidates(&w, phase), Instant::now() + Duration::from_millis(200));
                assert!(ms.iter().all(|m| m.ns().is_some() || m.outcome == crate::harness::Outcome::NotTimed), "{n}×{k} {phase:?}: {ms:?}");
                assert!(best(&ms).is_some());
            }
        }
        let w = Workload::Float { n: 61, k: 2592, dtype: DType::F16 };
        let mut kern = kernel(&w, Phase::Decode, 1).unwrap();
        let ms = sweep(kern.as_mut(), &candidates(&w, Phase::Decode), Instant::now() + Duration::from_millis(200));
        assert!(ms.iter().all(|m| m.ns().is_some()), "{ms:?}");
    }

    #[test]
    fn a_kernel_that_computes_wrong_is_caught() {
        let mut kern = TernaryKernel::new(5, 256, Phase::Decode, 1).unwrap();
        kern.want[7] += 1.0;
        let t = candidates(&Workload::Ternary { n: 5, k: 256 }, Phase::Decode)[0];
        assert!(kern.check(&t).unwrap_err().contains("element 7"));
        // Rows that are not whole I2_S blocks (bitnet_b1_58-3B's FFN) are
        // checked like any other.
        let w = Workload::Ternary { n: 5, k: 100 };
        let mut kern = TernaryKernel::new(5, 100, Phase::Decode, 1).unwrap();
        for t in candidates(&w, Phase::Decode) {
            assert_eq!(kern.check(&t), Ok(()), "{t:?}");
        }
    }

    #[test]
    fn cache_sizes_parse() {
        assert_eq!(parse_size("32768K"), Some(32 << 20));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("x"), None);
    }
}
