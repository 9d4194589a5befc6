//! Every CUDA kernel family run on the CPU (`cuda::emulator`: one host
//! thread per CUDA thread) against a plain reference, at awkward sizes:
//! what the kernels compute is checked without a GPU, in CI. Integer
//! products must agree bit for bit (the tensor cores' `mma` fragments
//! included); float sums within the budget of their different order.
//! Without a C++20 compiler the tests say so and skip.

use bitnet_codegen::cpu::ternary::PackedTernary;
use bitnet_codegen::cuda::emulator::{BlockOrder, Buffer, Module, Param};
use bitnet_codegen::cuda::kernels::{self as k, Acts, CudaTiles, FloatType, TernaryEpilogue};
use bitnet_codegen::cuda::{padded, Grid, Kernel};
use bitnet_ir::{GateAct, RopeMode};

/// A deterministic stream of numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in `[-1, 1)`.
    fn float(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 30) as f32 - 1.0
    }
    fn below(&mut self, n: u32) -> i32 {
        (self.next() % n) as i32
    }
}

/// The kernels `(name, block, code)` compiled for the host, or `None`
/// (said on stderr) where there is no C++ compiler.
fn build(test: &str, kernels: &[(&str, u32, String)]) -> Option<Module> {
    let kernels: Vec<Kernel> = kernels.iter().map(|(n, b, c)| Kernel::new(n, *b, c)).collect();
    Module::build_or_skip(test, k::PRELUDE, &kernels.iter().collect::<Vec<_>>())
}

fn launch(m: &Module, entry: &str, grid: (u32, u32, u32), block: u32, params: &[Param]) {
    // SAFETY: each test passes its kernel's parameters, with buffers sized
    // for the launch.
    unsafe { m.launch(entry, (grid.0, grid.1), block, params) }.unwrap_or_else(|e| panic!("{e}"));
}

/// Int8 activations of `s` tokens of `k` (padded to `kp`): codes, γ, Σq.
fn activations(rng: &mut Rng, s: usize, kk: usize, kp: usize) -> (Vec<i8>, Vec<f32>, Vec<i32>) {
    let mut q = vec![0i8; s * kp];
    for t in 0..s {
        for j in 0..kk {
            q[t * kp + j] = (rng.below(255) - 127) as i8;
        }
    }
    let gamma: Vec<f32> = (0..s).map(|_| 10.0 + 100.0 * rng.float().abs()).collect();
    let sum: Vec<i32> = (0..s).map(|t| q[t * kp..][..kp].iter().map(|&c| c as i32).sum()).collect();
    (q, gamma, sum)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    assert!(!want.is_empty(), "{what}: nothing compared");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}: value {i} is {g}, want {w}");
    }
}

#[test]
fn ternary_products_are_exact_on_every_tile_shape() {
    let tiles = [
        CudaTiles::DEFAULT,
        CudaTiles { warps: 1, tokens: 1, mma: false },
        CudaTiles { warps: 8, tokens: 8, mma: false },
        CudaTiles::MMA_DEFAULT,
        CudaTiles { warps: 1, tokens: 16, mma: true },
    ];
    let mut rng = Rng(7);
    for (n, kk) in [(1, 1), (3, 200), (37, 783)] {
        let kp = padded(kk);
        let values: Vec<Vec<i8>> = (0..2).map(|_| (0..n * kk).map(|_| rng.below(3) as i8 - 1).collect()).collect();
        let beta = [0.37f32, 1.9];
        let packed: Vec<Buffer> = (0..2)
            .map(|w| Buffer::of(PackedTernary::from_rows(n, kk, 1, beta[w], |r, out| out.copy_from_slice(&values[w][r * kk..][..kk])).data().as_bytes()))
            .collect();
        let dot = |w: usize, q: &[i8], t: usize, r: usize| -> i32 { (0..kk).map(|j| values[w][r * kk + j] as i32 * q[t * kp + j] as i32).sum() };
        let product = |w: usize, q: &[i8], gamma: &[f32], t: usize, r: usize| (dot(w, q, t, r) as f32 * beta[w]) / gamma[t];
        let mut kernels = Vec::new();
        for (i, t) in tiles.iter().enumerate() {
            kernels.push((format!("tm{i}"), t.block(), k::ternary_matmul(n, kp, TernaryEpilogue { scale: true, residual: true }, Acts::Given, *t)));
            kernels.push((format!("glu{i}"), t.block(), k::ternary_glu(n, kp, GateAct::Relu2, false, Acts::Given, *t)));
        }
        let named: Vec<(&str, u32, String)> = kernels.iter().map(|(a, b, c)| (a.as_str(), *b, c.clone())).collect();
        let Some(m) = build("ternary products", &named) else { return };
        for s in [1, 3, 9, 33] {
            let (q, gamma, qsum) = activations(&mut rng, s, kk, kp);
            let residual: Vec<f32> = (0..s * n).map(|_| rng.float()).collect();
            let scale = [1.25f32];
            let mut want = vec![0f32; s * n];
            let mut want_glu = vec![0f32; s * n];
            for t in 0..s {
                for r in 0..n {
                    want[t * n + r] = product(0, &q, &gamma, t, r) * scale[0] + residual[t * n + r];
                    let g = product(0, &q, &gamma, t, r).max(0.0);
                    want_glu[t * n + r] = g * g * product(1, &q, &gamma, t, r);
                }
            }
            let (qb, gb, sb) = (Buffer::of(&q), Buffer::of(&gamma), Buffer::of(&qsum));
            let (scale_b, res_b) = (Buffer::of(&scale), Buffer::of(&residual));
            for (i, t) in tiles.iter().enumerate() {
                let grid = t.grid(n).dims(s, t.block(), 0);
                let mut out = vec![f32::NAN; s * n];
                let params = [
                    packed[0].param(),
                    Param::F32(beta[0]),
                    qb.param(),
                    gb.param(),
                    sb.param(),
                    scale_b.param(),
                    res_b.param(),
                    Param::of(&mut out),
                    Param::I32(s as i32),
                ];
                launch(&m, &format!("tm{i}"), grid, t.block(), &params);
                assert_eq!(out, want, "ternary_matmul {n}×{kk}, {s} tokens, {t}");
                let mut out = vec![f32::NAN; s * n];
                let params = [
                    packed[0].param(),
                    Param::F32(beta[0]),
                    packed[1].param(),
                    Param::F32(beta[1]),
                    qb.param(),
                    gb.param(),
                    sb.param(),
                    Param::of(&mut out),
                    Param::I32(s as i32),
                ];
                launch(&m, &format!("glu{i}"), grid, t.block(), &params);
                assert_eq!(out, want_glu, "ternary_glu {n}×{kk}, {s} tokens, {t}");
            }
        }
    }
}

/// One launch over several weights' rows (q, k and v as one product):
/// each part's results are its own product's bit for bit, written to
/// buffers of their own or side by side in one, on every tile shape. The
/// parts' rows are not multiples of 16, so tensor-core tiles straddle them.
#[test]
fn one_product_of_several_weights_gives_each_its_own() {
    let tiles = [CudaTiles::DEFAULT, CudaTiles { warps: 8, tokens: 1, mma: false }, CudaTiles::MMA_DEFAULT, CudaTiles { warps: 1, tokens: 16, mma: true }];
    let mut rng = Rng(11);
    let (rows, kk) = ([37usize, 5, 20], 783);
    let (kp, n) = (padded(kk), rows.iter().sum::<usize>());
    let starts = [0, rows[0], rows[0] + rows[1]];
    let values: Vec<Vec<i8>> = rows.iter().map(|&r| (0..r * kk).map(|_| rng.below(3) as i8 - 1).collect()).collect();
    let (beta, scale) = ([0.37f32, 1.9, 0.61], [[1.25f32], [0.5], [3.0]]);
    let packed: Vec<Buffer> = (0..3)
        .map(|j| Buffer::of(PackedTernary::from_rows(rows[j], kk, 1, beta[j], |r, out| out.copy_from_slice(&values[j][r * kk..][..kk])).data().as_bytes()))
        .collect();
    let apart: Vec<k::Columns> = rows.iter().map(|&width| k::Columns { width, start: 0 }).collect();
    let side_by_side: Vec<k::Columns> = starts.iter().map(|&start| k::Columns { width: n, start }).collect();
    let mut kernels = Vec::new();
    for (i, t) in tiles.iter().enumerate() {
        kernels.push((format!("apart{i}"), t.block(), k::ternary_cat(&rows, kp, true, &apart, Acts::Given, *t)));
        kernels.push((format!("joined{i}"), t.block(), k::ternary_cat(&rows, kp, true, &side_by_side, Acts::Given, *t)));
    }
    let named: Vec<(&str, u32, String)> = kernels.iter().map(|(a, b, c)| (a.as_str(), *b, c.clone())).collect();
    let Some(m) = build("ternary cat", &named) else { return };
    let scales: Vec<Buffer> = scale.iter().map(|s| Buffer::of(s)).collect();
    for s in [1, 3, 33] {
        let (q, gamma, qsum) = activations(&mut rng, s, kk, kp);
        let want: Vec<Vec<f32>> = (0..3)
            .map(|j| {
                let mut y = vec![0f32; s * rows[j]];
                for t in 0..s {
                    for r in 0..rows[j] {
                        let dot: i32 = (0..kk).map(|c| values[j][r * kk + c] as i32 * q[t * kp + c] as i32).sum();
                        y[t * rows[j] + r] = (dot as f32 * beta[j]) / gamma[t] * scale[j][0];
                    }
                }
                y
            })
            .collect();
        let (qb, gb, sb) = (Buffer::of(&q), Buffer::of(&gamma), Buffer::of(&qsum));
        let mut weights = Vec::new();
        for j in 0..3 {
            weights.extend([packed[j].param(), Param::F32(beta[j]), scales[j].param()]);
        }
        weights.extend([qb.param(), gb.param(), sb.param()]);
        for (i, t) in tiles.iter().enumerate() {
            let grid = t.grid(n).dims(s, t.block(), 0);
            let mut outs: Vec<Vec<f32>> = rows.iter().map(|&r| vec![f32::NAN; s * r]).collect();
            let mut params = weights.clone();
            params.extend(outs.iter_mut().map(|o| Param::of(o)));
            params.push(Param::I32(s as i32));
            launch(&m, &format!("apart{i}"), grid, t.block(), &params);
            assert_eq!(outs, want, "ternary_cat {rows:?}×{kk} into three buffers, {s} tokens, {t}");
            let mut joined = vec![f32::NAN; s * n];
            let mut params = weights.clone();
            params.extend((0..3).map(|_| Param::of(&mut joined)));
            params.push(Param::I32(s as i32));
            launch(&m, &format!("joined{i}"), grid, t.block(), &params);
            for j in 0..3 {
                let part: Vec<f32> = joined.chunks(n).flat_map(|row| &row[starts[j]..starts[j] + rows[j]]).copied().collect();
                assert_eq!(part, want[j], "ternary_cat part {j} side by side, {s} tokens, {t}");
            }
        }
    }
}

/// A one-token product that quantizes its f32 row itself (with its
/// RMSNorm or without) gives what the quantizing launch and the product
/// after it give, on dot-product and tensor-core tiles.
#[test]
fn a_one_token_product_quantizes_its_row_as_the_launch_before_it() {
    let tiles = [CudaTiles::DEFAULT, CudaTiles { warps: 1, tokens: 1, mma: false }, CudaTiles::MMA_DEFAULT];
    let mut rng = Rng(17);
    for (n, kk) in [(37, 783), (5, 2592)] {
        let kp = padded(kk);
        let ws: Vec<Vec<i8>> = (0..2).map(|_| (0..n * kk).map(|_| rng.below(3) as i8 - 1).collect()).collect();
        let packed: Vec<Buffer> = ws
            .iter()
            .map(|w| Buffer::of(PackedTernary::from_rows(n, kk, 1, 0.5, |r, out| out.copy_from_slice(&w[r * kk..][..kk])).data().as_bytes()))
            .collect();
        let x: Vec<f32> = (0..kk).map(|_| 4.0 * rng.float()).collect();
        let norm_w: Vec<f32> = (0..kk).map(|_| 0.5 + rng.float().abs()).collect();
        let (scale, residual) = ([1.5f32], (0..n).map(|_| rng.float()).collect::<Vec<f32>>());
        let ep = TernaryEpilogue { scale: true, residual: true };
        for norm in [Some(1e-5f32), None] {
            let mut kernels = vec![("quantize".to_string(), k::NORM_BLOCK, k::quantize_rows(kk, kp, norm))];
            for (i, t) in tiles.iter().enumerate() {
                let acts = |here| Acts::Rows { k: kk, norm, here };
                kernels.push((format!("tm{i}"), t.block(), k::ternary_matmul(n, kp, ep, acts(false), *t)));
                kernels.push((format!("tm_own{i}"), t.block(), k::ternary_matmul(n, kp, ep, acts(true), *t)));
                kernels.push((format!("glu{i}"), t.block(), k::ternary_glu(n, kp, GateAct::Relu2, false, acts(false), *t)));
                kernels.push((format!("glu_own{i}"), t.block(), k::ternary_glu(n, kp, GateAct::Relu2, false, acts(true), *t)));
            }
            let named: Vec<(&str, u32, String)> = kernels.iter().map(|(a, b, c)| (a.as_str(), *b, c.clone())).collect();
            let Some(m) = build("one-token products", &named) else { return };
            let (xb, nb) = (Buffer::of(&x), Buffer::of(&norm_w));
            let (q, gamma, qsum) = (Buffer::zeroed(kp), Buffer::zeroed(4), Buffer::zeroed(4));
            let rows = match norm {
                Some(_) => vec![xb.param(), nb.param()],
                None => vec![xb.param()],
            };
            let quantized = [&rows[..], &[q.param(), gamma.param(), qsum.param(), Param::I32(1)]].concat();
            launch(&m, "quantize", (1, 1, 1), k::NORM_BLOCK, &quantized);
            // The one-token kernels get acts they must not read.
            let (junk_q, junk_g, junk_s) = (Buffer::of(&vec![7i8; kp]), Buffer::of(&[f32::NAN]), Buffer::of(&[3i32]));
            let (scale_b, res_b) = (Buffer::of(&scale), Buffer::of(&residual));
            for (i, t) in tiles.iter().enumerate() {
                let grid = t.grid(n).dims(1, t.block(), 0);
                let run = |entry: &str, acts: [Param; 3], weights: &[Param], tail: &[Param]| {
                    let mut out = vec![f32::NAN; n];
                    let params = [weights, &acts, &rows, tail, &[Param::of(&mut out), Param::I32(1)]].concat();
                    launch(&m, entry, grid, t.block(), &params);
                    out
                };
                let given = [q.param(), gamma.param(), qsum.param()];
                let junk = [junk_q.param(), junk_g.param(), junk_s.param()];
                let tm = [packed[0].param(), Param::F32(0.5)];
                let tail = [scale_b.param(), res_b.param()];
                let want = run(&format!("tm{i}"), given, &tm, &tail);
                assert!(want.iter().all(|v| v.is_finite()), "{want:?}");
                assert_eq!(run(&format!("tm_own{i}"), junk, &tm, &tail), want, "ternary_matmul {n}×{kk}, norm {norm:?}, {t}");
                let glu = [packed[0].param(), Param::F32(0.5), packed[1].param(), Param::F32(0.5)];
                let want = run(&format!("glu{i}"), given, &glu, &[]);
                assert_eq!(run(&format!("glu_own{i}"), junk, &glu, &[]), want, "ternary_glu {n}×{kk}, norm {norm:?}, {t}");
            }
        }
    }
}

#[test]
fn int8_and_float_products_match_the_reference() {
    let mut rng = Rng(11);
    let t = CudaTiles::DEFAULT;
    for (n, kk) in [(3, 1), (5, 783), (9, 784)] {
        let kp = padded(kk);
        let mut kernels = vec![("int8mm".to_string(), t.block(), k::int8_matmul(n, kp, t))];
        for ty in [FloatType::F32, FloatType::F16, FloatType::BF16] {
            kernels.push((format!("mm_{}", ty.name()), t.block(), k::matmul(ty, n, kk, t)));
        }
        let named: Vec<(&str, u32, String)> = kernels.iter().map(|(a, b, c)| (a.as_str(), *b, c.clone())).collect();
        let Some(m) = build("int8 and float products", &named) else { return };
        let s = 5;
        let grid = t.grid(n).dims(s, t.block(), 0);
        // Int8 rows with a scale each.
        let mut w = vec![0i8; n * kp];
        for r in 0..n {
            for j in 0..kk {
                w[r * kp + j] = (rng.below(255) - 127) as i8;
            }
        }
        let wscale: Vec<f32> = (0..n).map(|_| rng.float().abs() + 0.01).collect();
        let (q, gamma, qsum) = activations(&mut rng, s, kk, kp);
        let mut want = vec![0f32; s * n];
        for tt in 0..s {
            for r in 0..n {
                let dot: i32 = (0..kp).map(|j| w[r * kp + j] as i32 * q[tt * kp + j] as i32).sum();
                want[tt * n + r] = dot as f32 * wscale[r] / gamma[tt];
            }
        }
        let mut out = vec![f32::NAN; s * n];
        let (wb, sb, qb, gb, qs) = (Buffer::of(&w), Buffer::of(&wscale), Buffer::of(&q), Buffer::of(&gamma), Buffer::of(&qsum));
        launch(&m, "int8mm", grid, t.block(), &[wb.param(), sb.param(), qb.param(), gb.param(), qs.param(), Param::of(&mut out), Param::I32(s as i32)]);
        assert_eq!(out, want, "int8_matmul {n}×{kk}");
        // Float weights as stored.
        let x: Vec<f32> = (0..s * kk).map(|_| rng.float()).collect();
        let wf: Vec<f32> = (0..n * kk).map(|_| rng.float()).collect();
        for ty in [FloatType::F32, FloatType::F16, FloatType::BF16] {
            let (bytes, values): (Vec<u8>, Vec<f32>) = match ty {
                FloatType::F32 => (wf.iter().flat_map(|v| v.to_le_bytes()).collect(), wf.clone()),
                FloatType::F16 => {
                    (wf.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(), wf.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect())
                }
                FloatType::BF16 => {
                    (wf.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(), wf.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect())
                }
            };
            let mut want = vec![0f32; s * n];
            for tt in 0..s {
                for r in 0..n {
                    want[tt * n + r] = (0..kk).map(|j| values[r * kk + j] as f64 * x[tt * kk + j] as f64).sum::<f64>() as f32;
                }
            }
            let mut out = vec![f32::NAN; s * n];
            let (wb, xb) = (Buffer::of(&bytes), Buffer::of(&x));
            launch(&m, &format!("mm_{}", ty.name()), grid, t.block(), &[wb.param(), xb.param(), Param::of(&mut out), Param::I32(s as i32)]);
            assert_close(&format!("matmul {} {n}×{kk}", ty.name()), &out, &want, 1e-5);
        }
    }
}

#[test]
fn quantized_rows_are_the_interpreters() {
    let mut rng = Rng(3);
    for kk in [1, 3, 783, 2560 + 32] {
        let kp = padded(kk);
        let eps = 1e-5f32;
        let kernels = [("qn", k::NORM_BLOCK, k::quantize_rows(kk, kp, Some(eps))), ("rn", k::NORM_BLOCK, k::rms_norm(kk, eps))];
        let Some(m) = build("quantized rows", &kernels) else { return };
        let s = 3;
        let x: Vec<f32> = (0..s * kk).map(|_| 4.0 * rng.float()).collect();
        let w: Vec<f32> = (0..kk).map(|_| rng.float()).collect();
        let (mut q, mut gamma, mut sum) = (vec![99i8; s * kp], vec![f32::NAN; s], vec![-1i32; s]);
        let mut normed = vec![f32::NAN; s * kk];
        let (xb, wb) = (Buffer::of(&x), Buffer::of(&w));
        let grid = Grid::PerRow.dims(s, k::NORM_BLOCK, 0);
        launch(&m, "qn", grid, k::NORM_BLOCK, &[xb.param(), wb.param(), Param::of(&mut q), Param::of(&mut gamma), Param::of(&mut sum), Param::I32(s as i32)]);
        launch(&m, "rn", grid, k::NORM_BLOCK, &[xb.param(), wb.param(), Param::of(&mut normed), Param::I32(s as i32)]);
        for t in 0..s {
            let row = &x[t * kk..][..kk];
            let acc: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
            let inv = 1.0 / ((acc / kk as f64) as f32 + eps).sqrt();
            let v: Vec<f32> = row.iter().zip(&w).map(|(&a, &b)| a * inv * b).collect();
            assert_close(&format!("rms_norm of {kk}"), &normed[t * kk..][..kk], &v, 1e-6);
            let amax = v.iter().fold(0f32, |m, a| m.max(a.abs())).max(1e-5);
            let g = 127.0 / amax;
            assert!((gamma[t] - g).abs() <= 1e-6 * g, "γ of {kk}: {} against {g}", gamma[t]);
            let codes = &q[t * kp..][..kp];
            assert!(codes[kk..].iter().all(|&c| c == 0), "padding codes of {kk}");
            for (j, (&c, &a)) in codes.iter().zip(&v).enumerate() {
                let want = (a * g).round().clamp(-128.0, 127.0);
                // The order of the f64 sum may move a value across a rounding edge.
                assert!((c as f32 - want).abs() <= 1.0, "code {j} of {kk}: {c} against {want}");
            }
            assert_eq!(sum[t], codes.iter().map(|&c| c as i32).sum::<i32>(), "Σq of {kk}");
        }
    }
}

#[test]
fn paged_attention_reads_each_rows_own_blocks() {
    let mut rng = Rng(5);
    let (heads, kv_heads, shift) = (4, 2, 2u32);
    for d in [64, 128, 3] {
        // The positions in one chunk, and in chunks of 3 (2 to 4 of them, the
        // last one short) whose softmax the block merges.
        let kernels = [
            ("store", k::ROW_BLOCK, k::kv_store(kv_heads, d, shift)),
            ("attend", k::ROW_BLOCK, k::attention(heads, kv_heads, d, shift, None, 64, false)),
            ("attend_chunks", k::ROW_BLOCK, k::attention(heads, kv_heads, d, shift, None, 3, false)),
        ];
        let Some(m) = build("paged attention", &kernels) else { return };
        let (block, pool, width) = (1usize << shift, 8usize, 4usize);
        // Two sequences: the first's blocks 5, 2; the second's 0, 7, 3. This
        // step: the first's positions 4..7, the second's 8 and 9.
        let tables = [vec![5, 2, 0, 0], vec![0, 7, 3, 0]];
        let rows = [(0usize, 4usize), (0, 5), (0, 6), (1, 8), (1, 9)];
        let s = rows.len();
        let at = |seq: usize, h: usize, p: usize| ((h * pool + tables[seq][p / block] as usize) * block + p % block) * d;
        let mut kc: Vec<f32> = (0..kv_heads * pool * block * d).map(|_| rng.float()).collect();
        let mut vc: Vec<f32> = (0..kv_heads * pool * block * d).map(|_| rng.float()).collect();
        let q: Vec<f32> = (0..s * heads * d).map(|_| rng.float()).collect();
        let kn: Vec<f32> = (0..s * kv_heads * d).map(|_| rng.float()).collect();
        let vn: Vec<f32> = (0..s * kv_heads * d).map(|_| rng.float()).collect();
        let pos: Vec<i32> = rows.iter().map(|r| r.1 as i32).collect();
        let mut flat: Vec<i32> = rows.iter().flat_map(|r| tables[r.0].clone()).collect();
        // What the cache holds after the store, and the attention over it.
        let (mut kw, mut vw) = (kc.clone(), vc.clone());
        for (i, &(seq, p)) in rows.iter().enumerate() {
            for h in 0..kv_heads {
                kw[at(seq, h, p)..][..d].copy_from_slice(&kn[(i * kv_heads + h) * d..][..d]);
                vw[at(seq, h, p)..][..d].copy_from_slice(&vn[(i * kv_heads + h) * d..][..d]);
            }
        }
        let mut want = vec![0f32; s * heads * d];
        for (i, &(seq, p)) in rows.iter().enumerate() {
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let qh = &q[(i * heads + h) * d..][..d];
                let scores: Vec<f32> =
                    (0..=p).map(|t| qh.iter().zip(&kw[at(seq, kvh, t)..][..d]).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()).collect();
                let mx = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let e: Vec<f32> = scores.iter().map(|&x| (x - mx).exp()).collect();
                let total: f32 = e.iter().sum();
                for j in 0..d {
                    want[(i * heads + h) * d + j] = (0..=p).map(|t| e[t] / total * vw[at(seq, kvh, t) + j]).sum();
                }
            }
        }
        let (qb, kb, vb, pb) = (Buffer::of(&q), Buffer::of(&kn), Buffer::of(&vn), Buffer::of(&pos));
        let (w, b, sp) = (Param::I32(width as i32), Param::I32(pool as i32), Param::I32(s as i32));
        let store = [kb.param(), vb.param(), pb.param(), Param::of(&mut flat), w, b, Param::of(&mut kc), Param::of(&mut vc), sp];
        launch(&m, "store", Grid::PerRow.dims(s, k::ROW_BLOCK, 0), k::ROW_BLOCK, &store);
        assert_eq!(kc, kw, "keys stored, d = {d}");
        assert_eq!(vc, vw, "values stored, d = {d}");
        for entry in ["attend", "attend_chunks"] {
            let mut out = vec![f32::NAN; s * heads * d];
            let unused = Buffer::zeroed(4);
            let params = [
                qb.param(),
                kb.param(),
                vb.param(),
                pb.param(),
                Param::of(&mut flat),
                w,
                b,
                Param::of(&mut kc),
                Param::of(&mut vc),
                unused.param(),
                Param::of(&mut out),
                sp,
            ];
            launch(&m, entry, Grid::HeadsByRows { heads }.dims(s, k::ROW_BLOCK, 0), k::ROW_BLOCK, &params);
            assert_close(&format!("{entry}, d = {d}"), &out, &want, 1e-5);
        }
    }
}

#[test]
fn rows_rope_and_elementwise_kernels_match_the_reference() {
    let mut rng = Rng(9);
    let (row, d, s, vocab) = (24, 8, 3, 5);
    let theta = 10000.0f32;
    let kernels = [
        ("rope_i", k::ROW_BLOCK, k::rope(row, d, RopeMode::Interleaved, theta)),
        ("rope_n", k::ROW_BLOCK, k::rope(row, d, RopeMode::Neox, theta)),
        ("pick_rows", k::ROW_BLOCK, k::select_rows(row)),
        ("columns", k::ROW_BLOCK, k::slice(row, 7, 10)),
        ("softmax", k::ROW_BLOCK, k::softmax(row)),
        ("embed", k::ROW_BLOCK, k::embed(FloatType::F16, vocab, row)),
        ("cast", k::ELEMENT_BLOCK, k::cast(FloatType::F16, row)),
    ];
    let Some(m) = build("rows", &kernels) else { return };
    let x: Vec<f32> = (0..s * row).map(|_| 3.0 * rng.float()).collect();
    let pos = [0i32, 5, 17];
    let ts = theta.powf(-2.0 / d as f32);
    for (entry, mode) in [("rope_i", RopeMode::Interleaved), ("rope_n", RopeMode::Neox)] {
        let mut want = x.clone();
        for t in 0..s {
            for p in 0..row / 2 {
                let (head, i) = (p / (d / 2), p % (d / 2));
                let mut angle = pos[t] as f32;
                for _ in 0..i {
                    angle *= ts;
                }
                let (a, b) = match mode {
                    RopeMode::Interleaved => (head * d + 2 * i, head * d + 2 * i + 1),
                    RopeMode::Neox => (head * d + i, head * d + i + d / 2),
                };
                let (x0, x1) = (x[t * row + a], x[t * row + b]);
                want[t * row + a] = x0 * angle.cos() - x1 * angle.sin();
                want[t * row + b] = x0 * angle.sin() + x1 * angle.cos();
            }
        }
        let mut out = vec![f32::NAN; s * row];
        let (xb, pb) = (Buffer::of(&x), Buffer::of(&pos));
        launch(&m, entry, Grid::PerRow.dims(s, k::ROW_BLOCK, 0), k::ROW_BLOCK, &[xb.param(), pb.param(), Param::of(&mut out), Param::I32(s as i32)]);
        assert_close(entry, &out, &want, 1e-6);
    }
    // Rows 2 and 0, in that order.
    let pick = [2i32, 0];
    let mut out = vec![f32::NAN; 2 * row];
    let (xb, pb) = (Buffer::of(&x), Buffer::of(&pick));
    launch(&m, "pick_rows", Grid::PerRow.dims(2, k::ROW_BLOCK, 0), k::ROW_BLOCK, &[xb.param(), pb.param(), Param::of(&mut out), Param::I32(2)]);
    assert_eq!(out, [&x[2 * row..3 * row], &x[..row]].concat());
    let mut out = vec![f32::NAN; s * 10];
    launch(&m, "columns", Grid::PerRow.dims(s, k::ROW_BLOCK, 0), k::ROW_BLOCK, &[xb.param(), Param::of(&mut out), Param::I32(s as i32)]);
    assert_eq!(out, x.chunks(row).flat_map(|r| &r[7..17]).copied().collect::<Vec<_>>(), "slice");
    let mut out = vec![f32::NAN; s * row];
    launch(&m, "softmax", Grid::PerRow.dims(s, k::ROW_BLOCK, 0), k::ROW_BLOCK, &[xb.param(), Param::of(&mut out), Param::I32(s as i32)]);
    for t in 0..s {
        let r = &x[t * row..][..row];
        let mx = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let total: f32 = r.iter().map(|&v| (v - mx).exp()).sum();
        let want: Vec<f32> = r.iter().map(|&v| (v - mx).exp() / total).collect();
        assert_close("softmax", &out[t * row..][..row], &want, 1e-6);
    }
    let table: Vec<half::f16> = (0..vocab * row).map(|_| half::f16::from_f32(rng.float())).collect();
    let ids = [4i32, 0, 4];
    let mut out = vec![f32::NAN; s * row];
    let (tb, ib) = (Buffer::of(&table), Buffer::of(&ids));
    launch(&m, "embed", Grid::PerRow.dims(s, k::ROW_BLOCK, 0), k::ROW_BLOCK, &[tb.param(), ib.param(), Param::of(&mut out), Param::I32(s as i32)]);
    let want: Vec<f32> = ids.iter().flat_map(|&i| table[i as usize * row..][..row].iter().map(|v| v.to_f32())).collect();
    assert_eq!(out, want, "embed");
    let mut out = vec![f32::NAN; s * row];
    let grid = Grid::Elements { row }.dims(s, k::ELEMENT_BLOCK, 0);
    launch(&m, "cast", grid, k::ELEMENT_BLOCK, &[xb.param(), Param::of(&mut out), Param::I32(s as i32)]);
    assert_eq!(out, x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect::<Vec<_>>(), "cast to f16");
}

/// The fused launch (RoPE of queries and keys, keys and values stored in
/// their blocks) computes exactly what `rope` twice and `kv_store` do.
#[test]
fn fused_rope_and_store_equal_the_separate_kernels() {
    let mut rng = Rng(13);
    let (heads, kv_heads, d, shift, theta) = (4, 2, 16, 2u32, 10000.0f32);
    for mode in [RopeMode::Interleaved, RopeMode::Neox] {
        let kernels = [
            ("fused", k::ROW_BLOCK, k::rope_kv_store(heads, kv_heads, d, mode, theta, shift)),
            ("rope_q", k::ROW_BLOCK, k::rope(heads * d, d, mode, theta)),
            ("rope_k", k::ROW_BLOCK, k::rope(kv_heads * d, d, mode, theta)),
            ("store", k::ROW_BLOCK, k::kv_store(kv_heads, d, shift)),
        ];
        let Some(m) = build("fused rope and store", &kernels) else { return };
        let (pool, width, s) = (6usize, 3usize, 4usize);
        let pos = [0i32, 5, 6, 9];
        let mut tables: Vec<i32> = vec![2, 0, 0, 4, 1, 0, 4, 1, 0, 5, 3, 0];
        let q: Vec<f32> = (0..s * heads * d).map(|_| rng.float()).collect();
        let kk: Vec<f32> = (0..s * kv_heads * d).map(|_| rng.float()).collect();
        let v: Vec<f32> = (0..s * kv_heads * d).map(|_| rng.float()).collect();
        let cache: Vec<f32> = (0..kv_heads * pool * (1 << shift) * d).map(|_| rng.float()).collect();
        let (qb, kb, vb, pb) = (Buffer::of(&q), Buffer::of(&kk), Buffer::of(&v), Buffer::of(&pos));
        let (w, b, sp, grid) = (Param::I32(width as i32), Param::I32(pool as i32), Param::I32(s as i32), Grid::PerRow.dims(s, k::ROW_BLOCK, 0));
        // Separately: RoPE of each, then the store of the rotated keys.
        let (mut rq, mut rk) = (vec![f32::NAN; q.len()], vec![f32::NAN; kk.len()]);
        launch(&m, "rope_q", grid, k::ROW_BLOCK, &[qb.param(), pb.param(), Param::of(&mut rq), sp]);
        launch(&m, "rope_k", grid, k::ROW_BLOCK, &[kb.param(), pb.param(), Param::of(&mut rk), sp]);
        let (mut kc, mut vc) = (cache.clone(), cache.clone());
        launch(
            &m,
            "store",
            grid,
            k::ROW_BLOCK,
            &[Param::of(&mut rk), vb.param(), pb.param(), Param::of(&mut tables), w, b, Param::of(&mut kc), Param::of(&mut vc), sp],
        );
        // Fused.
        let (mut fq, mut fkc, mut fvc) = (vec![f32::NAN; q.len()], cache.clone(), cache.clone());
        let params =
            [qb.param(), kb.param(), vb.param(), pb.param(), Param::of(&mut tables), w, b, Param::of(&mut fkc), Param::of(&mut fvc), Param::of(&mut fq), sp];
        launch(&m, "fused", grid, k::ROW_BLOCK, &params);
        assert_eq!(fq, rq, "{mode:?}: rotated queries");
        assert_eq!(fkc, kc, "{mode:?}: stored keys");
        assert_eq!(fvc, vc, "{mode:?}: stored values");
        assert_ne!(kc, cache, "{mode:?}: the store wrote");
    }
}

/// A one-token attention that does its own RoPE gives what the store
/// launch and the attention after it give, bit for bit: the same output,
/// and the same keys and values left in the cache for the next step.
#[test]
fn one_token_attention_rotates_and_stores_as_the_launch_before_it() {
    let mut rng = Rng(19);
    let (heads, kv_heads, d, shift, theta) = (6, 2, 16, 2u32, 10000.0f32);
    for mode in [RopeMode::Interleaved, RopeMode::Neox] {
        let own = |here| Some(k::OwnRope { mode, theta, here });
        let kernels = [
            ("store", k::ROW_BLOCK, k::rope_kv_store(heads, kv_heads, d, mode, theta, shift)),
            ("attend", k::ROW_BLOCK, k::attention(heads, kv_heads, d, shift, own(false), 64, false)),
            ("attend_own", k::ROW_BLOCK, k::attention(heads, kv_heads, d, shift, own(true), 64, false)),
        ];
        let Some(m) = build("one-token attention", &kernels) else { return };
        let (pool, width) = (6usize, 3usize);
        for position in [0i32, 9] {
            let pos = [position];
            let mut tables: Vec<i32> = vec![4, 0, 2];
            let q: Vec<f32> = (0..heads * d).map(|_| rng.float()).collect();
            let kk: Vec<f32> = (0..kv_heads * d).map(|_| rng.float()).collect();
            let v: Vec<f32> = (0..kv_heads * d).map(|_| rng.float()).collect();
            let cache: Vec<f32> = (0..kv_heads * pool * (1 << shift) * d).map(|_| rng.float()).collect();
            let (qb, kb, vb, pb) = (Buffer::of(&q), Buffer::of(&kk), Buffer::of(&v), Buffer::of(&pos));
            let (w, b, one) = (Param::I32(width as i32), Param::I32(pool as i32), Param::I32(1));
            let grid = Grid::HeadsByRows { heads }.dims(1, k::ROW_BLOCK, 0);
            // The store launch, then the attention.
            let (mut kc, mut vc, mut rq) = (cache.clone(), cache.clone(), vec![f32::NAN; q.len()]);
            let store =
                [qb.param(), kb.param(), vb.param(), pb.param(), Param::of(&mut tables), w, b, Param::of(&mut kc), Param::of(&mut vc), Param::of(&mut rq), one];
            launch(&m, "store", (1, 1, 1), k::ROW_BLOCK, &store);
            let mut want = vec![f32::NAN; q.len()];
            let junk = Buffer::of(&vec![f32::NAN; q.len()]);
            let mut params = vec![Param::of(&mut rq), junk.param(), vb.param(), pb.param(), qb.param(), kb.param(), Param::of(&mut tables), w, b];
            params.extend([Param::of(&mut kc), Param::of(&mut vc), junk.param(), Param::of(&mut want), one]);
            launch(&m, "attend", grid, k::ROW_BLOCK, &params);
            // One launch, its blocks in either order; the rotated queries it
            // is handed are not read.
            for order in BlockOrder::ALL {
                m.set_block_order(order);
                let (mut own_kc, mut own_vc, mut got) = (cache.clone(), cache.clone(), vec![f32::NAN; q.len()]);
                let mut params = vec![junk.param(), junk.param(), vb.param(), pb.param(), qb.param(), kb.param(), Param::of(&mut tables), w, b];
                params.extend([Param::of(&mut own_kc), Param::of(&mut own_vc), junk.param(), Param::of(&mut got), one]);
                launch(&m, "attend_own", grid, k::ROW_BLOCK, &params);
                assert!(want.iter().all(|x| x.is_finite()), "{mode:?}, position {position}");
                assert_eq!(got, want, "{mode:?}, position {position}, {order:?}: attention");
                assert_eq!(own_kc, kc, "{mode:?}, position {position}, {order:?}: stored keys");
                assert_eq!(own_vc, vc, "{mode:?}, position {position}, {order:?}: stored values");
            }
            assert_ne!(kc, cache, "{mode:?}: the store wrote");
        }
    }
}

/// One token's attention split in chunks of a few positions, over as many
/// blocks or fewer (each merging a run of chunks), adds their parts up to
/// what one block over all of them gives (within the float budget of
/// another order of sums; exactly while one chunk holds them all), stores
/// the same key and value, and leaves its counters at zero for the next
/// launch.
#[test]
fn split_attention_adds_its_parts_up_as_one_block() {
    let mut rng = Rng(23);
    let (heads, kv_heads, d, shift, theta, split) = (6, 2, 16, 2u32, 10000.0f32, 4usize);
    let own = Some(k::OwnRope { mode: RopeMode::Neox, theta, here: true });
    let kernels = [
        ("whole", k::ROW_BLOCK, k::attention(heads, kv_heads, d, shift, own, 64, false)),
        ("split", k::ROW_BLOCK, k::attention(heads, kv_heads, d, shift, own, split, true)),
    ];
    let Some(m) = build("split attention", &kernels) else { return };
    let (pool, width) = (8usize, 4usize);
    let context = width << shift;
    let splits = Buffer::zeroed(4 * k::split_floats(heads, d, context / split));
    for position in [0i32, 3, 4, 9, 15] {
        let pos = [position];
        let mut tables: Vec<i32> = vec![6, 1, 3, 0];
        let q: Vec<f32> = (0..heads * d).map(|_| rng.float()).collect();
        let kk: Vec<f32> = (0..kv_heads * d).map(|_| rng.float()).collect();
        let v: Vec<f32> = (0..kv_heads * d).map(|_| rng.float()).collect();
        let cache: Vec<f32> = (0..kv_heads * pool * (1 << shift) * d).map(|_| 2.0 * rng.float()).collect();
        let (qb, kb, vb, pb, junk) = (Buffer::of(&q), Buffer::of(&kk), Buffer::of(&v), Buffer::of(&pos), Buffer::of(&vec![f32::NAN; q.len()]));
        let (w, b, one) = (Param::I32(width as i32), Param::I32(pool as i32), Param::I32(1));
        let mut run = |entry: &str, grid: Grid| {
            let (mut kc, mut vc, mut out) = (cache.clone(), cache.clone(), vec![f32::NAN; q.len()]);
            let mut params = vec![junk.param(), junk.param(), vb.param(), pb.param(), qb.param(), kb.param(), Param::of(&mut tables), w, b];
            params.extend([Param::of(&mut kc), Param::of(&mut vc), splits.param(), Param::of(&mut out), one]);
            launch(&m, entry, grid.dims(1, k::ROW_BLOCK, context), k::ROW_BLOCK, &params);
            (out, kc, vc)
        };
        let want = run("whole", Grid::HeadsByRows { heads });
        // A chunk a block, two chunks a block (one and two at position 9),
        // every chunk in one block; each twice, the second time on the
        // counters the first left.
        let cases = [4, 2, 1].into_iter().flat_map(|b| [(b, 0), (b, 1)]);
        for (order, (blocks, round)) in BlockOrder::ALL.into_iter().flat_map(|o| cases.clone().map(move |c| (o, c))) {
            m.set_block_order(order);
            let grid = Grid::HeadsBySplits { heads, split: k::DecodeSplit { positions: split, blocks } };
            let got = run("split", grid);
            if position < split as i32 {
                assert_eq!(got.0, want.0, "position {position}: one chunk is the whole");
            }
            assert_close(&format!("position {position}, {blocks} blocks a head, {order:?}, round {round}"), &got.0, &want.0, 1e-5);
            assert_eq!((&got.1, &got.2), (&want.1, &want.2), "position {position}: the stored key and value");
            assert_eq!(splits.read::<i32>(heads), vec![0; heads], "position {position}: the counters are back at zero");
        }
    }
}
