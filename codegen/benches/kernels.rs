//! Kernel benchmarks at the BitNet b1.58 2B4T shapes, reported as GB/s of
//! weights streamed (criterion's bytes throughput), next to the machine's
//! read bandwidth as a plain sum (`read_bandwidth`; the runtime's roofline,
//! `pool::read_bandwidth`, also sums with software prefetch and keeps the
//! faster).
//!
//! `cargo bench -p bitnet-codegen --bench kernels` (set `BITNET_BENCH_THREADS`, default 2).
//! Each matrix is larger than the last-level cache several times over in
//! total, and the benchmark cycles through several copies, so decode GEMVs
//! read their weights from DRAM as they do in a model.

use bitnet_codegen::cpu::ternary::{self, Epilogue, PackedTernary, Packing, QuantActs, Split, TernaryTiles};
use bitnet_codegen::cpu::{float, int4, ops, Isa, Pool};
use bitnet_ir::interp::WeightView;
use bitnet_ir::DType;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SHAPES: [(usize, usize); 4] = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)];
/// Copies cycled through, to keep the weights out of cache.
const COPIES: usize = 8;

fn threads() -> usize {
    std::env::var("BITNET_BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2)
}

fn acts(s: usize, k: usize) -> QuantActs {
    let x: Vec<f32> = (0..s * k).map(|i| ((i * 7919) % 255) as f32 - 127.0).collect();
    let mut a = QuantActs::default();
    ops::quantize_rows(&x, k, None, &mut a);
    a
}

fn packed(n: usize, k: usize, rows: usize, packing: Packing, seed: usize) -> PackedTernary {
    PackedTernary::pack(n, k, rows, packing, 1.0, |r, out| out.iter_mut().enumerate().for_each(|(i, c)| *c = ((r * 31 + i * 7 + seed) % 3) as i8 - 1))
}

fn read_bandwidth(c: &mut Criterion) {
    let pool = Pool::new(threads());
    let data: Vec<u64> = (0..(512usize << 20) / 8).map(|i| i as u64).collect();
    let mut g = c.benchmark_group("read_bandwidth");
    g.throughput(Throughput::Bytes((data.len() * 8) as u64));
    g.sample_size(10);
    g.bench_function("sum_512MiB", |b| {
        b.iter(|| {
            let total = std::sync::atomic::AtomicU64::new(0);
            pool.run(&|me, n| {
                let part = &data[bitnet_codegen::cpu::pool::share(data.len(), me, n)];
                let s = part.chunks_exact(8).fold([0u64; 8], |mut acc, c| {
                    for i in 0..8 {
                        acc[i] = acc[i].wrapping_add(c[i]);
                    }
                    acc
                });
                total.fetch_add(s.iter().fold(0, |a, &b| a.wrapping_add(b)), std::sync::atomic::Ordering::Relaxed);
            });
            total.into_inner()
        })
    });
}

fn ternary_gemv(c: &mut Criterion) {
    let pool = Pool::new(threads());
    let isa = Isa::best();
    let mut g = c.benchmark_group("ternary_gemv");
    g.sample_size(20);
    // Both packings side by side: the time per product is what to compare
    // (the throughput is of each one's own bytes).
    for (n, k) in SHAPES {
        for (rows, packing) in TernaryTiles::ROWS.into_iter().flat_map(|r| Packing::ALL.map(|p| (r, p))) {
            let ws: Vec<PackedTernary> = (0..COPIES).map(|s| packed(n, k, rows, packing, s)).collect();
            let x = acts(1, k);
            let mut out = vec![0f32; n];
            let tiles = TernaryTiles { packing, ..TernaryTiles::new(isa, rows, 1) };
            g.throughput(Throughput::Bytes(ws[0].bytes() as u64));
            let mut i = 0;
            g.bench_function(BenchmarkId::new(format!("{n}x{k}"), tiles), |b| {
                b.iter(|| {
                    i = (i + 1) % COPIES;
                    ternary::matmul(&pool, tiles, &ws[i], &x, &mut out, Epilogue::default());
                })
            });
        }
    }
}

fn ternary_gemm(c: &mut Criterion) {
    let pool = Pool::new(threads());
    let isa = Isa::best();
    let mut g = c.benchmark_group("ternary_gemm_128_tokens");
    g.sample_size(10);
    for (n, k) in SHAPES {
        for (rows, tokens, packing) in [(1, 4), (2, 4), (4, 4), (4, 2), (2, 2)].into_iter().flat_map(|(r, t)| Packing::ALL.map(|p| (r, t, p))) {
            let w = packed(n, k, rows, packing, 0);
            let x = acts(128, k);
            let mut out = vec![0f32; 128 * n];
            let tiles = TernaryTiles { packing, ..TernaryTiles::new(isa, rows, tokens) };
            // Work, not bytes: 128 tokens times the weights.
            g.throughput(Throughput::Elements((128 * n * k) as u64));
            g.bench_function(BenchmarkId::new(format!("{n}x{k}"), tiles), |b| b.iter(|| ternary::matmul(&pool, tiles, &w, &x, &mut out, Epilogue::default())));
        }
    }
}

/// One batched decode step of eight sequences: eight tokens, the weights
/// streamed from memory (`cold`, copies cycled) or warm in cache (one
/// copy; 2560×2560 fits L3) — the difference is what memory costs the kernel.
fn ternary_batch(c: &mut Criterion) {
    let pool = Pool::new(threads());
    let isa = Isa::best();
    let tokens = 8;
    let mut g = c.benchmark_group("ternary_batch_8_tokens");
    g.sample_size(20);
    for (n, k) in [(2560, 2560), (6912, 2560), (2560, 6912)] {
        for (rows, step, packing, split) in [
            (4, 4, Packing::Bits2, Split::Rows),
            (4, 4, Packing::Bits2, Split::Tokens),
            (2, 4, Packing::Bits2, Split::Rows),
            (4, 2, Packing::Bits2, Split::Rows),
            (4, 4, Packing::Base3, Split::Rows),
        ] {
            let ws: Vec<PackedTernary> = (0..COPIES).map(|s| packed(n, k, rows, packing, s)).collect();
            let x = acts(tokens, k);
            let mut out = vec![0f32; tokens * n];
            let tiles = TernaryTiles { packing, split, ..TernaryTiles::new(isa, rows, step) };
            g.throughput(Throughput::Elements((tokens * n * k) as u64));
            for (name, copies) in [("cold", COPIES), ("warm", 1)] {
                let mut i = 0;
                g.bench_function(BenchmarkId::new(format!("{n}x{k}/{name}"), tiles), |b| {
                    b.iter(|| {
                        i = (i + 1) % copies;
                        ternary::matmul(&pool, tiles, &ws[i], &x, &mut out, Epilogue::default());
                    })
                });
            }
        }
    }
}

/// The 2B4T head (128256 × 2560) for one token, stored f16 and `--head
/// q4`, with each ISA that has kernels of its own for them: GB/s of each
/// one's own bytes, so compare times across the two layouts.
fn head_gemv(c: &mut Criterion) {
    let pool = Pool::new(threads());
    let (n, k) = (128256, 2560);
    let bytes: Vec<u8> = (0..n * k).flat_map(|i| half::f16::from_f32(((i % 17) as f32 - 8.0) / 64.0).to_le_bytes()).collect();
    let w = WeightView { dtype: DType::F16, shape: vec![n, k], data: &bytes };
    let x: Vec<f32> = (0..k).map(|i| (i % 13) as f32 / 13.0).collect();
    let mut out = vec![0f32; n];
    let isas: Vec<Isa> = [Isa::Avx512Vnni, Isa::Avx2, Isa::Cranelift].into_iter().filter(|i| i.available()).collect();
    let mut g = c.benchmark_group("head_gemv");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    // AVX-512 VNNI runs AVX2's f16 kernels.
    for &isa in isas.iter().filter(|&&i| i.float_kernels() == i) {
        g.bench_function(format!("f16_128256x2560/{}", isa.name()), |b| b.iter(|| float::matmul(&pool, isa, &w, &x, &mut out)));
    }
    let q4 = int4::Int4Rows::quantize(&w);
    let mut acts = QuantActs::default();
    ops::quantize_rows(&x, k, None, &mut acts);
    g.throughput(Throughput::Bytes(q4.bytes() as u64));
    for &isa in isas.iter().filter(|&&i| i != Isa::Cranelift) {
        g.bench_function(format!("q4_128256x2560/{}", isa.name()), |b| b.iter(|| int4::matmul(&pool, isa, &q4, &acts, &mut out)));
    }
    drop(g);
    // Eight sequences' decode step (`bench --parallel 8`): the head is read
    // once for eight tokens, so its arithmetic counts.
    let tokens = 8;
    let x8: Vec<f32> = (0..tokens * k).map(|i| (i % 13) as f32 / 13.0 - (i % 5) as f32 / 7.0).collect();
    ops::quantize_rows(&x8, k, None, &mut acts);
    let mut out = vec![0f32; tokens * n];
    let mut g = c.benchmark_group("head_8_tokens");
    g.sample_size(10);
    g.throughput(Throughput::Elements((tokens * n * k) as u64));
    for &isa in [Isa::Avx512Vnni, Isa::Avx2].iter().filter(|i| i.available()) {
        g.bench_function(format!("f16_128256x2560/{}", isa.name()), |b| b.iter(|| float::matmul(&pool, isa, &w, &x8, &mut out)));
        g.bench_function(format!("q4_128256x2560/{}", isa.name()), |b| b.iter(|| int4::matmul(&pool, isa, &q4, &acts, &mut out)));
    }
    drop(g);
    // The same product on 512 rows, which stay in the cores' L2 between
    // iterations: its arithmetic alone, against which the DRAM-bound figure
    // above says how much of the head's time is waiting on memory.
    let rows = 512;
    let cached = WeightView { dtype: DType::F16, shape: vec![rows, k], data: &bytes[..rows * k * 2] };
    let mut out = vec![0f32; tokens * rows];
    let mut g = c.benchmark_group("head_8_tokens_cached");
    g.throughput(Throughput::Elements((tokens * rows * k) as u64));
    for &isa in [Isa::Avx512Vnni, Isa::Avx2].iter().filter(|i| i.available()) {
        g.bench_function(format!("f16_512x2560/{}", isa.name()), |b| b.iter(|| float::matmul(&pool, isa, &cached, &x8, &mut out)));
    }
}

/// The elementwise families on one decode token's rows, native against
/// Cranelift-generated (the same bits; which is faster).
fn elementwise(c: &mut Criterion) {
    use bitnet_codegen::cpu::jit::{ElementwiseJit, NormQuantJit};
    use bitnet_ir::GateAct;
    let mut g = c.benchmark_group("elementwise");
    for k in [2560usize, 6912] {
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let w: Vec<f32> = (0..k).map(|i| 1.0 + (i % 5) as f32 * 0.1).collect();
        g.throughput(Throughput::Bytes((k * 4) as u64));
        let mut acts = QuantActs::default();
        g.bench_function(BenchmarkId::new("rms_norm_quant/native", k), |b| b.iter(|| ops::quantize_rows(&x, k, Some((&w, 1e-5)), &mut acts)));
        if let Ok(jit) = NormQuantJit::get() {
            let (mut scratch, mut q) = (vec![0f32; k], vec![0i8; k]);
            g.bench_function(BenchmarkId::new("rms_norm_quant/cranelift", k), |b| b.iter(|| jit.row(&x, Some((&w, 1e-5)), &mut scratch, &mut q)));
        }
        let mut out = vec![0f32; k];
        g.bench_function(BenchmarkId::new("glu_silu/native", k), |b| b.iter(|| ops::glu(GateAct::Silu, &x, &w, &mut out)));
        g.bench_function(BenchmarkId::new("glu_relu2/native", k), |b| b.iter(|| ops::glu(GateAct::Relu2, &x, &w, &mut out)));
        if let Ok(jit) = ElementwiseJit::get() {
            g.bench_function(BenchmarkId::new("glu_silu/cranelift", k), |b| b.iter(|| jit.glu(GateAct::Silu, &x, &w, &mut out)));
            g.bench_function(BenchmarkId::new("glu_relu2/cranelift", k), |b| b.iter(|| jit.glu(GateAct::Relu2, &x, &w, &mut out)));
        }
    }
}

/// Attention at the 2B4T shape (20 query heads, 5 KV heads of 128), all
/// 30 layers in turn as a model runs them (so that the cache comes from
/// memory, not from L3): one decode step after `cached` positions, and a
/// 128-token prefill. Elements are bytes of keys and values read.
fn attention(c: &mut Criterion) {
    use bitnet_codegen::cpu::attention::{attention, AttentionShape};
    use bitnet_ir::interp::{KvCache, KvPages, KvType};
    const LAYERS: usize = 30;
    let pool = Pool::new(threads());
    let shape = |layer| AttentionShape { layer, heads: 20, kv_heads: 5, head_dim: 128 };
    let mut g = c.benchmark_group("attention_30_layers");
    g.sample_size(10);
    for (cached, tokens) in [(512usize, 1usize), (128, 1), (0, 128)] {
        let n = cached + tokens;
        let f = |len: usize, seed: usize| -> Vec<f32> { (0..len).map(|i| ((i * 7 + seed) % 13) as f32 / 13.0 - 0.5).collect() };
        let mut kv = KvCache::with_capacity(n);
        let positions: Vec<i32> = (0..n as i32).collect();
        let mut out = vec![0f32; n * 20 * 128];
        let (q, k, v) = (f(n * 2560, 1), f(n * 640, 2), f(n * 640, 3));
        for layer in 0..LAYERS {
            attention(&pool, Isa::best(), shape(layer), &q, &k, &v, &positions, &mut kv, &mut out).unwrap();
        }
        let (q, k, v) = (f(tokens * 2560, 4), f(tokens * 640, 5), f(tokens * 640, 6));
        let mut out = vec![0f32; tokens * 2560];
        g.throughput(Throughput::Bytes((LAYERS * n * 640 * 4 * 2) as u64));
        // The native kernel, and the Cranelift-generated one (a head at a time).
        for (isa, prefix) in [(Isa::best(), ""), (Isa::Cranelift, "cranelift/")].into_iter().filter(|(i, _)| i.available()) {
            g.bench_function(format!("{prefix}{cached}_cached_{tokens}_tokens"), |b| {
                b.iter(|| {
                    kv.truncate(cached);
                    for layer in 0..LAYERS {
                        attention(&pool, isa, shape(layer), &q, &k, &v, &positions[cached..], &mut kv, &mut out).unwrap()
                    }
                })
            });
        }
        // The same in the runtime's paged cache (blocks of 16 positions, in
        // order, as a fresh engine hands them out), f32 and f16.
        if tokens == 1 {
            for ty in KvType::ALL {
                let blocks = n.div_ceil(16);
                let mut pages = KvPages::new(LAYERS, 5, 128, 16, blocks, ty);
                let table: Vec<u32> = (0..blocks as u32).collect();
                let (tables, held) = (vec![&table[..]; n], (1..=n).collect::<Vec<_>>());
                let (fq, fk, fv) = (f(n * 2560, 1), f(n * 640, 2), f(n * 640, 3));
                let mut all = vec![0f32; n * 2560];
                for layer in 0..LAYERS {
                    attention(&pool, Isa::best(), shape(layer), &fq, &fk, &fv, &positions, &mut pages.rows(&tables, &held), &mut all).unwrap();
                }
                let name = if ty == KvType::F32 { "paged".to_string() } else { format!("paged_{}", ty.name()) };
                g.throughput(Throughput::Bytes((LAYERS * n * 640 * ty.bytes() * 2) as u64));
                g.bench_function(format!("{name}/{cached}_cached_{tokens}_tokens"), |b| {
                    b.iter(|| {
                        for layer in 0..LAYERS {
                            let mut rows = pages.rows(&tables[cached..], &held[cached..]);
                            attention(&pool, Isa::best(), shape(layer), &q, &k, &v, &positions[cached..], &mut rows, &mut out).unwrap()
                        }
                    })
                });
            }
        }
    }
}

/// The ceiling of the prefill kernel: how many `pmaddubsw` + `paddw`
/// pairs (32 products each, the AVX2 prefill kernel's whole inner loop)
/// one core issues per second, from registers, with six independent
/// chains. Elements are pairs; times 32 it is products per second.
#[cfg(target_arch = "x86_64")]
fn avx2_issue_rate(c: &mut Criterion) {
    use std::arch::x86_64::*;
    if !Isa::Avx2.available() {
        return;
    }
    const STEPS: usize = 1 << 16;
    #[target_feature(enable = "avx2")]
    unsafe fn pairs(w: __m256i, x: __m256i) -> [__m256i; 6] {
        let mut acc = [_mm256_setzero_si256(); 6];
        // Six different operands, so that no product is computed once for all.
        let xs: [__m256i; 6] = std::array::from_fn(|i| _mm256_add_epi8(x, _mm256_set1_epi8(i as i8)));
        for _ in 0..STEPS {
            let w = std::hint::black_box(w);
            for (a, &x) in acc.iter_mut().zip(&xs) {
                *a = _mm256_add_epi16(*a, _mm256_maddubs_epi16(w, x));
            }
        }
        acc
    }
    let mut g = c.benchmark_group("avx2_issue_rate");
    g.throughput(Throughput::Elements((STEPS * 6) as u64));
    // SAFETY: AVX2 was checked above.
    g.bench_function("pmaddubsw+paddw", |b| b.iter(|| unsafe { pairs(_mm256_set1_epi8(2), _mm256_set1_epi8(-3)) }));
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_issue_rate(_: &mut Criterion) {}

criterion_group!(benches, read_bandwidth, ternary_gemv, ternary_gemm, ternary_batch, head_gemv, elementwise, attention, avx2_issue_rate);
criterion_main!(benches);
