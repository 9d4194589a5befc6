//! The weight reads of one decode step at the 2B4T shape: 30 layers'
//! ternary products (521 MB of 2-bit weights: more than a 300 MB L3 holds)
//! and the f16 head (657 MB), each round after the roofline's
//! read-bandwidth probe, so that they are measured in the same seconds of a
//! noisy machine:
//!
//! ```sh
//! cargo run --release -p bitnet-codegen --example step_products   # ROUNDS=9 THREADS=2
//! ```
//!
//! One process, so both read memory placed alike: comparing builds or
//! runs of different processes adds each one's luck with its pages.
use bitnet_codegen::cpu::ternary::{self, Epilogue, PackedTernary, Packing, QuantActs, TernaryTiles};
use bitnet_codegen::cpu::{blob::Blob, float, ops, pool, Isa, Pool};
use bitnet_ir::interp::WeightView;
use bitnet_ir::{DType, GateAct};
use std::time::Instant;

fn packed(n: usize, k: usize, seed: usize) -> PackedTernary {
    PackedTernary::pack(n, k, 4, Packing::Bits2, 1.0, |r, out| out.iter_mut().enumerate().for_each(|(i, c)| *c = ((r * 31 + i * 7 + seed) % 3) as i8 - 1))
}

fn acts(k: usize) -> QuantActs {
    let x: Vec<f32> = (0..k).map(|i| ((i * 7919) % 255) as f32 - 127.0).collect();
    let mut a = QuantActs::default();
    ops::quantize_rows(&x, k, None, &mut a);
    a
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let (threads, rounds) = (env("THREADS", 2), env("ROUNDS", 9).max(1));
    let pool = Pool::new(threads);
    let tiles = TernaryTiles::new(Isa::best(), 4, 1);
    let (d, f, kv) = (2560, 6912, 640);
    // q, k, v, o, gate, up, down.
    let layers: Vec<[PackedTernary; 7]> = (0..30)
        .map(|l| {
            [packed(d, d, l), packed(kv, d, l + 1), packed(kv, d, l + 2), packed(d, d, l + 3), packed(f, d, l + 4), packed(f, d, l + 5), packed(d, f, l + 6)]
        })
        .collect();
    let bytes: usize = layers.iter().flatten().map(|w| w.bytes()).sum();
    let vocab = 128256;
    let head_bytes = Blob::from_fn(vocab * d * 2, |i| if i % 2 == 0 { (i % 251) as u8 } else { 0x2c });
    let head = WeightView { dtype: DType::F16, shape: vec![vocab, d], data: &head_bytes[..] };
    let (x_head, mut logits) = ((0..d).map(|i| (i % 13) as f32 / 13.0).collect::<Vec<f32>>(), vec![0f32; vocab]);
    let (xd, xf) = (acts(d), acts(f));
    let (mut qkv, mut o, mut h, mut down) = (vec![0f32; d + 2 * kv], vec![0f32; d], vec![0f32; f], vec![0f32; d]);
    println!("{} threads, {}: {bytes} bytes of ternary weights and {} of head a step", threads, tiles, head_bytes.len());
    let (mut fractions, mut head_fractions) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let bw = pool::read_bandwidth(&pool, 256 << 20, 1);
        let mut ms = [0f64; 4];
        let mut timed = |i: usize, f: &mut dyn FnMut()| {
            let t = Instant::now();
            f();
            ms[i] += t.elapsed().as_secs_f64() * 1e3;
        };
        let t0 = Instant::now();
        for [q, k, v, wo, g, u, dn] in &layers {
            timed(0, &mut || ternary::matmul_cat(&pool, tiles, &[(q, None), (k, None), (v, None)], &xd, &mut qkv));
            timed(1, &mut || ternary::matmul(&pool, tiles, wo, &xd, &mut o, Epilogue::default()));
            timed(2, &mut || ternary::matmul_glu(&pool, tiles, GateAct::Silu, (g, None), (u, None), &xd, &mut h));
            timed(3, &mut || ternary::matmul(&pool, tiles, dn, &xf, &mut down, Epilogue::default()));
        }
        let step = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        float::matmul(&pool, Isa::best(), &head, &x_head, &mut logits);
        let head_s = t1.elapsed().as_secs_f64();
        let (rate, head_rate) = (bytes as f64 / step, head_bytes.len() as f64 / head_s);
        println!(
            "read bandwidth {:.1} GB/s; ternary {:.2} ms, {:.1} GB/s: {:.3} of it (qkv {:.2}, o {:.2}, gate-up {:.2}, down {:.2} ms); head {:.2} ms, {:.1} GB/s: {:.3}",
            bw / 1e9,
            step * 1e3,
            rate / 1e9,
            rate / bw,
            ms[0],
            ms[1],
            ms[2],
            ms[3],
            head_s * 1e3,
            head_rate / 1e9,
            head_rate / bw
        );
        fractions.push(rate / bw);
        head_fractions.push(head_rate / bw);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("median fraction of the read bandwidth: ternary products {:.3}, head {:.3}", median(&mut fractions), median(&mut head_fractions));
}
