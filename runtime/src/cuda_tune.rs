//! Autotuning the CUDA matrix products on this machine's GPU.
//!
//! Every candidate tile of a workload becomes a kernel of one NVRTC
//! module. Each runs on the same random weights and activations; its
//! result must equal the default dot-product tiles' bit for bit (the sums are over
//! integers, or in the same order for float weights), else it is recorded
//! as wrong and never chosen. The right ones are timed with CUDA events:
//! decode (one token) cycles through enough copies of the weights that
//! they come from memory, not from L2, as in a model of many layers, and
//! each block normalizes and quantizes the token's f32 row itself, as the
//! one-token kernels of a lowered step do (see `kernels::Acts`); prefill
//! runs [`bitnet_autotune::space::PREFILL_TOKENS`] tokens. Results go to the tuning
//! database under the GPU's fingerprint, phase by phase, as each job ends.

use crate::cuda::{device, fingerprint, ptr};
use bitnet_autotune::db::Database;
use bitnet_autotune::harness::{Measured, Outcome};
use bitnet_autotune::kernels::Lcg;
use bitnet_autotune::space::{cuda_candidates, Phase};
use bitnet_autotune::tune::{conclude, Job, JobReport};
use bitnet_codegen::cuda::kernels::{self, CudaTiles, TernaryEpilogue};
use bitnet_codegen::cuda::{device_float_type, nvrtc, padded, FloatType};
use bitnet_codegen::schedule::{Tiles, Workload};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Bytes of weight copies decode cycles through: several times an H100's
/// or H200's L2 (50–60 MB).
const COLD_BYTES: usize = 256 << 20;
/// Timed rounds per candidate; the median is kept.
const ROUNDS: usize = 5;

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> String + '_ {
    move |e| format!("CUDA {what}: {e:?}")
}

/// The GPU's description and tuning fingerprint, or why there is none.
pub fn gpu() -> Result<(String, String), String> {
    let (_, name) = device()?;
    Ok((fingerprint(&name), name))
}

/// Tunes every workload's phases on this GPU; `progress(done, total,
/// what)` is called before each job and once at the end.
pub fn tune(workloads: &[Workload], db: &Database, mut progress: impl FnMut(usize, usize, &str)) -> Result<Vec<JobReport>, String> {
    let (ctx, name) = device()?;
    let fp = fingerprint(&name);
    let (major, minor) = ctx.compute_capability().map_err(cuda_err("compute capability"))?;
    let sm = (major * 10 + minor) as u32;
    let stream = ctx.new_stream().map_err(cuda_err("creating a stream"))?;
    let jobs: Vec<(Workload, Phase)> = workloads.iter().flat_map(|w| Phase::of(w).iter().map(move |&p| (*w, p))).collect();
    let mut reports = Vec::new();
    for (i, &(w, phase)) in jobs.iter().enumerate() {
        let key = w.key();
        progress(i, jobs.len(), &format!("{key} ({})", phase.name()));
        let cands = cuda_candidates(&w, phase, sm);
        let measured = measure(&stream, sm, &w, phase, &cands);
        let tiles: Vec<Tiles> = cands.iter().map(|&t| Tiles::Cuda(t)).collect();
        let (report, records) = conclude(&Job { key, phase, fingerprint: &fp, threads: 1 }, &tiles, measured);
        db.merge(&records)?;
        reports.push(report);
    }
    progress(jobs.len(), jobs.len(), "done");
    Ok(reports)
}

/// What one workload's kernels read: weight copies and activations.
struct Inputs {
    weights: Vec<CudaSlice<u8>>,
    /// int8 codes (ternary) or f32 values (float), `tokens` rows.
    x: CudaSlice<u8>,
    /// The f32 rows the int8 codes of a ternary decode come from, and the
    /// RMSNorm's weight (random; a kernel that quantizes its row reads
    /// these instead of `x`, `gamma` and `qsum`).
    rows: CudaSlice<f32>,
    norm: CudaSlice<f32>,
    gamma: CudaSlice<f32>,
    qsum: CudaSlice<i32>,
    out: CudaSlice<f32>,
    tokens: usize,
}

/// Each candidate's median time, or why it is wrong.
fn measure(stream: &Arc<CudaStream>, sm: u32, w: &Workload, phase: Phase, cands: &[CudaTiles]) -> Result<Vec<Measured>, String> {
    let tokens = phase.tokens();
    let (n, k, module) = candidates(w, phase, cands);
    let ptx = nvrtc::compile(&module, sm)?;
    let ctx = stream.context();
    let m = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(cuda_err("loading the candidates"))?;
    let functions: Vec<CudaFunction> =
        (0..=cands.len()).map(|i| m.load_function(&format!("candidate_{i}")).map_err(cuda_err("loading a candidate"))).collect::<Result<_, _>>()?;
    let inputs = inputs(stream, w, n, k, tokens, phase)?;
    let run = |f: &CudaFunction, t: CudaTiles, copy: usize| -> Result<(), String> {
        let cfg = LaunchConfig { grid_dim: t.grid(n).dims(inputs.tokens, t.block(), 0), block_dim: (t.block(), 1, 1), shared_mem_bytes: 0 };
        let (wp, xp, gp, sp, op) =
            (ptr(&inputs.weights[copy], stream), ptr(&inputs.x, stream), ptr(&inputs.gamma, stream), ptr(&inputs.qsum, stream), ptr(&inputs.out, stream));
        let (beta, s) = (1.0f32, inputs.tokens as i32);
        let (rows, norm) = (ptr(&inputs.rows, stream), ptr(&inputs.norm, stream));
        let mut b = stream.launch_builder(f);
        b.arg(&wp);
        if w.is_ternary() {
            b.arg(&beta).arg(&xp).arg(&gp).arg(&sp);
            if let kernels::Acts::Rows { .. } = decode_acts(k, phase) {
                b.arg(&rows).arg(&norm);
            }
        } else {
            b.arg(&xp);
        }
        b.arg(&op).arg(&s);
        // SAFETY: the arguments follow the parameter list of the kernel
        // `candidates` wrote for this workload and phase, and every buffer has the sizes
        // those parameters imply for `tokens` rows.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(cuda_err("launching a candidate"))
    };
    let result = |f: &CudaFunction, t: CudaTiles| -> Result<Vec<f32>, String> {
        run(f, t, 0)?;
        stream.clone_dtoh(&inputs.out).map_err(cuda_err("copying a result back"))
    };
    let want = result(&functions[cands.len()], CudaTiles::DEFAULT)?;
    let event = || ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda_err("an event"));
    // Launches per round: about a millisecond of work for decode.
    let launches = if phase == Phase::Decode { 64 } else { 8 };
    let mut out = Vec::new();
    for (f, &t) in functions.iter().zip(cands) {
        let got = result(f, t)?;
        if got.iter().zip(&want).any(|(a, b)| a.to_bits() != b.to_bits()) {
            out.push(Measured { tiles: Tiles::Cuda(t), outcome: Outcome::Wrong(format!("differs from the result of {}", CudaTiles::DEFAULT)) });
            continue;
        }
        let mut times = Vec::new();
        for _ in 0..ROUNDS {
            let (start, end) = (event()?, event()?);
            start.record(stream).map_err(cuda_err("recording an event"))?;
            for i in 0..launches {
                run(f, t, i % inputs.weights.len())?;
            }
            end.record(stream).map_err(cuda_err("recording an event"))?;
            let ms = start.elapsed_ms(&end).map_err(cuda_err("timing"))? as f64;
            times.push((ms * 1e6 / launches as f64) as u64);
        }
        times.sort_unstable();
        out.push(Measured { tiles: Tiles::Cuda(t), outcome: Outcome::Timed { ns: times[ROUNDS / 2], runs: ROUNDS } });
    }
    Ok(out)
}

/// A workload's `n` and `k`, and the CUDA C of its candidates in `phase`:
/// `candidate_{i}` for each of `cands`, and the reference, the default
/// tiles, last.
fn candidates(w: &Workload, phase: Phase, cands: &[CudaTiles]) -> (usize, usize, String) {
    let (n, k, source): (usize, usize, Box<dyn Fn(CudaTiles) -> String>) = match *w {
        Workload::Ternary { n, k } => {
            let ep = TernaryEpilogue { scale: false, residual: false };
            let acts = decode_acts(k, phase);
            (n, k, Box::new(move |t| kernels::ternary_matmul(n, padded(k), ep, acts, t)))
        }
        Workload::Float { n, k, dtype } => {
            let ty = device_float_type(dtype);
            (n, k, Box::new(move |t| kernels::matmul(ty, n, k, t)))
        }
    };
    let mut module = String::from(kernels::PRELUDE);
    for (i, t) in cands.iter().chain([&CudaTiles::DEFAULT]).enumerate() {
        module += &format!("extern \"C\" __global__ void __launch_bounds__({}) candidate_{i}{}\n", t.block(), source(*t));
    }
    (n, k, module)
}

/// Where the activations of a ternary product of depth `k` come from in
/// `phase`: for one token, the kernel's own RMSNorm and quantization of
/// the row, which every block repeats (so the blocks' count and size
/// weigh on the time), as a lowered step's one-token products run; else
/// quantized before.
fn decode_acts(k: usize, phase: Phase) -> kernels::Acts {
    match phase {
        Phase::Decode => kernels::Acts::Rows { k, norm: Some(1e-5), here: true },
        Phase::Prefill | Phase::Batch => kernels::Acts::Given,
    }
}

/// Random weights in the kernel's layout (packed 2-bit codes for ternary,
/// as stored for float types), copied until decode reads from memory, and
/// random activations.
fn inputs(stream: &Arc<CudaStream>, w: &Workload, n: usize, k: usize, tokens: usize, phase: Phase) -> Result<Inputs, String> {
    let mut rng = Lcg(0x5eed ^ (n * 31 + k) as u64);
    let (bytes, x_bytes) = match *w {
        // Four codes a byte, each 0, 1 or 2 (−1, 0, +1); int8 activations.
        Workload::Ternary { .. } => (n * padded(k) / 4, tokens * padded(k)),
        Workload::Float { dtype, .. } => {
            let size = match device_float_type(dtype) {
                FloatType::F32 => 4,
                FloatType::F16 | FloatType::BF16 => 2,
            };
            (n * k * size, tokens * k * 4)
        }
    };
    let weight: Vec<u8> = match *w {
        Workload::Ternary { .. } => (0..bytes).map(|_| (0..4).fold(0u8, |b, i| b | (((rng.next_u32() % 3) as u8) << (2 * i)))).collect(),
        Workload::Float { dtype, .. } => match device_float_type(dtype) {
            // Small finite values: 2^-4 .. 2^-1 with random sign and mantissa.
            FloatType::F16 => (0..bytes / 2).flat_map(|_| ((rng.next_u32() as u16 & 0x83ff) | 0x2c00).to_le_bytes()).collect(),
            FloatType::BF16 => (0..bytes / 2).flat_map(|_| ((rng.next_u32() as u16 & 0x807f) | 0x3d80).to_le_bytes()).collect(),
            FloatType::F32 => (0..bytes / 4).flat_map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5).to_le_bytes()).collect(),
        },
    };
    let x: Vec<u8> = match *w {
        Workload::Ternary { .. } => {
            let kp = padded(k);
            (0..x_bytes).map(|i| if i % kp < k { (rng.next_u32() % 255) as u8 ^ 0x80 } else { 0 }).collect()
        }
        Workload::Float { .. } => (0..x_bytes / 4).flat_map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5).to_le_bytes()).collect(),
    };
    let copies = if phase == Phase::Decode { COLD_BYTES.div_ceil(bytes.max(1)).clamp(1, 64) } else { 1 };
    let free = stream.context().mem_get_info().map(|m| m.0).unwrap_or(usize::MAX);
    if bytes.saturating_mul(copies) > free / 2 {
        return Err(format!("{} MB of weights do not fit in the GPU's free memory ({} MB)", (bytes * copies) >> 20, free >> 20));
    }
    let up = cuda_err("uploading inputs");
    let mut weights = Vec::new();
    for _ in 0..copies {
        weights.push(stream.clone_htod(&weight).map_err(&up)?);
    }
    let gamma: Vec<f32> = (0..tokens).map(|t| 1.0 + t as f32 / 7.0).collect();
    let rows: Vec<f32> = (0..tokens * k).map(|_| rng.next_u32() as f32 / u32::MAX as f32 - 0.5).collect();
    let norm: Vec<f32> = (0..k).map(|_| 0.5 + rng.next_u32() as f32 / u32::MAX as f32).collect();
    Ok(Inputs {
        weights,
        x: stream.clone_htod(&x).map_err(&up)?,
        rows: stream.clone_htod(&rows).map_err(&up)?,
        norm: stream.clone_htod(&norm).map_err(&up)?,
        gamma: stream.clone_htod(&gamma).map_err(&up)?,
        qsum: stream.clone_htod(&vec![3i32; tokens]).map_err(&up)?,
        out: stream.alloc_zeros::<f32>(tokens * n).map_err(cuda_err("allocating"))?,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_ir::DType;

    /// Every workload's candidates compile for sm_80 in every phase it is
    /// tuned in, where NVRTC is (CI has it and sets
    /// `BITNET_REQUIRE_NVRTC`), and a ternary decode's kernels quantize
    /// their row themselves, as a lowered step's one-token products do.
    #[test]
    fn the_candidates_compile_and_decode_quantizes_its_row() {
        let workloads = [Workload::Ternary { n: 40, k: 300 }, Workload::Float { n: 48, k: 256, dtype: DType::F16 }];
        for w in workloads {
            for &phase in Phase::of(&w) {
                let cands = cuda_candidates(&w, phase, 80);
                let (_, _, module) = candidates(&w, phase, &cands);
                let what = format!("{} ({})", w.key(), phase.name());
                assert_eq!(module.contains("xq_gamma"), w.is_ternary() && phase == Phase::Decode, "{what}: quantizes its row");
                match nvrtc::library() {
                    Ok(_) => {
                        let ptx = nvrtc::compile(&module, 80).unwrap_or_else(|e| panic!("{what}: {e}"));
                        assert!((0..=cands.len()).all(|i| ptx.contains(&format!(".entry candidate_{i}("))), "{what}: a candidate is missing");
                    }
                    Err(e) if std::env::var_os("BITNET_REQUIRE_NVRTC").is_some() => panic!("BITNET_REQUIRE_NVRTC is set but {e}"),
                    Err(e) => eprintln!("{what} not compiled: {e}"),
                }
            }
        }
    }
}
