//! `bitnet bench`: llama-bench's two numbers for a loaded session.
//!
//! Prefill evaluates a prompt of `n_prompt` tokens and computes only the
//! last position's logits; decode then evaluates `n_gen` tokens one at a
//! time, each the previous step's argmax, never stopping at end of text.
//! Each is repeated and the median reported.

use crate::backend::{BackendKind, KernelTimes};
use crate::engine::Engine;
use crate::error::RuntimeError;
use crate::sampler::argmax;
use crate::sampler::SamplerConfig;
use crate::session::Session;
use std::time::Instant;

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub load_ms: f64,
    /// Process start to the first prompt's logits (the warmup's, or the
    /// first repetition's without one).
    pub cold_start_ms: f64,
    /// Whether an untimed prefill and decode step ran first ([`Plan::warmup`]).
    pub warmup: bool,
    pub peak_rss_bytes: u64,
    pub n_prompt: usize,
    pub n_gen: usize,
    pub threads: usize,
    pub reps: usize,
    /// One prefill of the prompt and then decode steps (up to
    /// [`PROFILED_STEPS`] of them, their mean), evaluated again kernel by
    /// kernel and timed ("executor": the time outside the kernels):
    /// milliseconds and calls per kernel family, slowest first (`"ternary_glu 812.400 (30), attention
    /// 95.100 (30), ..."`: strings, so that the JSON stays flat). Compiled
    /// backends only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill_kernel_ms: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_kernel_ms: Option<String>,
    /// On a GPU: its name, the weight bytes on it (read once per decoded
    /// token), its copy bandwidth measured here, and decode as a fraction
    /// of the roofline those two give.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuReport>,
    /// The CPU kernels' instruction set (compiled CPU backend only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isa: Option<String>,
    /// How the output head is read: stored, q8 or q4 (compiled CPU backend only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// How the KV cache holds keys and values: f32 or f16.
    pub cache_type: &'static str,
    /// On the CPU: the weight bytes a decode step reads, the read bandwidth
    /// measured here, and decode as a fraction of the roofline those give.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuRoofline>,
    /// With `--parallel N`: N sequences decoding together, and their
    /// tokens per second all together (`bench_parallel`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregate_decode_tok_s: Option<f64>,
    /// One decode step of the `parallel` sequences together, kernel by kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel_kernel_ms: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CpuRoofline {
    /// The packed ternary layout (`CompiledModel::weight_layout`).
    pub weight_layout: &'static str,
    pub bytes_per_token: usize,
    pub bandwidth_gbs: f64,
    /// Decode tokens/s over the tokens/s that reading `bytes_per_token`
    /// at `bandwidth_gbs` allows.
    pub roofline_fraction: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GpuReport {
    pub device: String,
    pub weight_bytes: usize,
    pub bandwidth_gb_s: f64,
    pub decode_roofline: f64,
    /// Kernel launches a decode step makes (one token).
    pub decode_launches: usize,
    /// Whether decode replayed a captured CUDA graph, and if not why.
    pub cuda_graphs: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_graph_error: Option<String>,
}

/// Decode steps timed kernel by kernel for `decode_kernel_ms`: one step's
/// times moved by a few milliseconds from run to run on a noisy machine.
pub const PROFILED_STEPS: usize = 8;

/// A prompt of ordinary token ids spread over the vocabulary.
fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab.max(1)) as u32).collect()
}

/// What `bench` and `bench_parallel` time: llama-bench's `-p`, `-n` and
/// `-r`, and its warmup.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub n_prompt: usize,
    pub n_gen: usize,
    /// Timed repetitions (at least one); the median is reported.
    pub reps: usize,
    /// One untimed prefill and decode step first, as llama-bench does
    /// unless `--no-warmup`: the timed repetitions then find the buffers
    /// of that prompt length allocated and the caches warm.
    pub warmup: bool,
}

impl Plan {
    fn check(&self, context: usize) -> Result<(), RuntimeError> {
        if self.n_prompt + self.n_gen > context {
            return Err(RuntimeError::Input(format!(
                "-p {} plus -n {} tokens do not fit in the context of {context} (raise it with -c)",
                self.n_prompt, self.n_gen
            )));
        }
        Ok(())
    }
}

/// Runs the plan's repetitions (after its warmup); `process_start` is when
/// the process started, before loading (for `cold_start_ms`), `on_rep`
/// hears each finished repetition.
pub fn bench(s: &mut Session, plan: Plan, process_start: Instant, mut on_rep: impl FnMut(usize)) -> Result<BenchReport, RuntimeError> {
    plan.check(s.context)?;
    let Plan { n_prompt, n_gen, reps, warmup } = plan;
    let reps = reps.max(1);
    let ids = prompt(n_prompt.max(1), s.vocab());
    let mut cold_start_ms = None;
    if warmup {
        s.reset();
        s.clear_prefix_cache();
        let next = argmax(&s.eval(&ids, false)?);
        cold_start_ms = Some(process_start.elapsed().as_secs_f64() * 1e3);
        if n_gen > 0 {
            s.eval(&[next], false)?;
        }
    }
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        s.reset();
        // Each repetition computes the whole prompt: no prefix from the last.
        s.clear_prefix_cache();
        let t0 = Instant::now();
        let logits = s.eval(&ids, false)?;
        if n_prompt > 0 {
            prefill.push(n_prompt as f64 / t0.elapsed().as_secs_f64());
        }
        let mut next = argmax(&logits);
        cold_start_ms.get_or_insert_with(|| process_start.elapsed().as_secs_f64() * 1e3);
        let t1 = Instant::now();
        for _ in 0..n_gen {
            next = argmax(&s.eval(&[next], false)?);
        }
        if n_gen > 0 {
            decode.push(n_gen as f64 / t1.elapsed().as_secs_f64());
        }
        on_rep(rep + 1);
    }
    let decode_tok_s = median(&mut decode);
    let (mut prefill_kernel_ms, mut decode_kernel_ms) = (None, None);
    if s.backend() == BackendKind::Compiled {
        s.reset();
        // Each repetition computes the whole prompt: no prefix from the last.
        s.clear_prefix_cache();
        let (logits, times) = s.profile(&ids, false)?;
        prefill_kernel_ms = Some(times.summary());
        let (mut next, mut steps) = (argmax(&logits), Vec::new());
        while steps.len() < n_gen.clamp(1, PROFILED_STEPS) && ids.len() + steps.len() < s.context {
            let (logits, times) = s.profile(&[next], false)?;
            next = argmax(&logits);
            steps.push(times);
        }
        if !steps.is_empty() {
            decode_kernel_ms = Some(KernelTimes::mean(&steps).summary());
        }
    }
    let gpu = s
        .with_backend(|b| {
            b.as_cuda().map(|c| {
                c.copy_bandwidth().map(|bw| GpuReport {
                    device: c.device.clone(),
                    weight_bytes: c.weight_bytes,
                    bandwidth_gb_s: bw / 1e9,
                    decode_roofline: decode_tok_s * c.weight_bytes as f64 / bw,
                    decode_launches: c.launches_for(1),
                    cuda_graphs: c.graphs,
                    cuda_graph_error: c.graph_error.clone(),
                })
            })
        })
        .transpose()?;
    let cpu = s.with_backend(|b| {
        b.as_compiled().map(|c| {
            let (bytes, bw) = (c.decode_bytes(&s.model), c.read_bandwidth());
            CpuRoofline {
                weight_layout: c.weight_layout(),
                bytes_per_token: bytes,
                bandwidth_gbs: bw / 1e9,
                roofline_fraction: decode_tok_s * bytes as f64 / bw,
            }
        })
    });
    Ok(BenchReport {
        cpu,
        prefill_kernel_ms,
        decode_kernel_ms,
        gpu,
        prefill_tok_s: median(&mut prefill),
        decode_tok_s,
        load_ms: s.load_ms,
        cold_start_ms: cold_start_ms.unwrap_or_default(),
        warmup,
        peak_rss_bytes: peak_rss(),
        n_prompt,
        n_gen,
        threads: s.threads,
        reps,
        isa: None,
        head: None,
        cache_type: s.kv_type().name(),
        parallel: None,
        aggregate_decode_tok_s: None,
        parallel_kernel_ms: None,
    })
}

/// Decode of `parallel` sequences at once: each prefills its own prompt
/// of `n_prompt` tokens, then all decode `n_gen` tokens in lockstep, one
/// step a token for every sequence. Returns the median over `reps` (after
/// the plan's warmup, if any) of the tokens decoded per second, all
/// sequences together.
pub fn bench_parallel(engine: &Engine, plan: Plan, parallel: usize) -> Result<(f64, Option<String>), RuntimeError> {
    plan.check(engine.context)?;
    let Plan { n_prompt, n_gen, reps, warmup } = plan;
    // Decode tokens per second over a lockstep run of `steps` steps.
    let run = |steps: usize| -> Result<f64, RuntimeError> {
        engine.clear_prefix_cache();
        let mut seqs = (0..parallel).map(|_| engine.new_sequence(SamplerConfig::default())).collect::<Result<Vec<_>, _>>()?;
        for (i, s) in seqs.iter_mut().enumerate() {
            // Prompts that differ from the first token: no prefix is shared.
            let mut ids = prompt(n_prompt.max(1) + 1, engine.vocab());
            let len = ids.len();
            ids.rotate_left(i % len);
            s.feed(&ids[..n_prompt.max(1)]);
        }
        step_all(engine, &mut seqs)?;
        let t0 = Instant::now();
        for _ in 0..steps {
            for s in seqs.iter_mut() {
                let next = argmax(s.last_logits().expect("stepped"));
                s.feed(&[next]);
            }
            step_all(engine, &mut seqs)?;
        }
        Ok((parallel * steps) as f64 / t0.elapsed().as_secs_f64())
    };
    if warmup {
        run(n_gen.min(1))?;
    }
    let mut rates = Vec::new();
    for _ in 0..reps.max(1) {
        let rate = run(n_gen)?;
        if n_gen > 0 {
            rates.push(rate);
        }
    }
    // One more batched decode step, kernel by kernel.
    let mut seqs = (0..parallel).map(|_| engine.new_sequence(SamplerConfig::default())).collect::<Result<Vec<_>, _>>()?;
    for (i, s) in seqs.iter_mut().enumerate() {
        s.feed(&prompt(n_prompt.max(1), engine.vocab())[..]);
        s.feed(&[i as u32 % engine.vocab() as u32]);
    }
    let times = if engine.backend_kind() == BackendKind::Compiled {
        step_all(engine, &mut seqs)?;
        for s in seqs.iter_mut() {
            s.feed(&[1]);
        }
        let mut refs: Vec<_> = seqs.iter_mut().collect();
        Some(engine.profile_step(&mut refs)?.summary())
    } else {
        None
    };
    Ok((median(&mut rates), times))
}

fn step_all(engine: &Engine, seqs: &mut [crate::engine::Sequence]) -> Result<(), RuntimeError> {
    let mut refs: Vec<_> = seqs.iter_mut().collect();
    engine.step(&mut refs).into_iter().collect()
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// The process's peak resident set (Linux `VmHWM`); 0 where unknown.
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(super::median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(super::median(&mut []), 0.0);
    }
}
