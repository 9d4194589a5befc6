//! `bitnet bench`: prefill and decode speed, like llama-bench.

use super::ModelArgs;
use bitnet_runtime::{bench, Device, Session};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens to prefill (only the last position's logits are computed).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 128)]
    pub n_prompt: usize,
    /// Tokens to decode one at a time (end of text is ignored).
    #[arg(short = 'n', long = "n-gen", default_value_t = 64)]
    pub n_gen: usize,
    /// Repetitions; the median is reported.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    pub reps: usize,
    /// Time from the first repetition on: no untimed prefill and decode
    /// step before it (llama-bench's flag of the same name).
    #[arg(long)]
    pub no_warmup: bool,
    /// Also decode this many sequences at once and report their tokens per
    /// second all together.
    #[arg(long)]
    pub parallel: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn bench(a: BenchArgs, process_start: std::time::Instant) -> anyhow::Result<()> {
    let engine = a.model.open(a.parallel.unwrap_or(1), None)?;
    let mut session = Session::new(engine.clone());
    let reps = a.reps.max(1);
    let plan = bench::Plan { n_prompt: a.n_prompt, n_gen: a.n_gen, reps, warmup: !a.no_warmup };
    let mut r = bench::bench(&mut session, plan, process_start, |done| {
        if !a.json {
            eprint!("\rrepetition {done}/{reps}");
            if done == reps {
                eprintln!();
            }
        }
    })?;
    if let Some(n) = a.parallel {
        drop(session);
        if !a.json {
            eprintln!("{n} sequences at once ...");
        }
        r.parallel = Some(n);
        let (agg, times) = bench::bench_parallel(&engine, plan, n)?;
        (r.aggregate_decode_tok_s, r.parallel_kernel_ms) = (Some(agg), times);
    }
    // The compiled CPU backend's kernels (none for the interpreter and CUDA).
    let schedule = engine.schedule();
    let isa = schedule.as_ref().map(|s| s.isa);
    r.isa = isa.map(|i| i.name().to_string());
    r.head = schedule.as_ref().map(|s| s.head().name().to_string());
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let name = a.model.model.file_name().map_or_else(|| a.model.model.display().to_string(), |n| n.to_string_lossy().into_owned());
    println!("| model | backend | threads | test | t/s |");
    println!("|---|---|---|---|---|");
    let backend = if engine.device() == Device::Cuda { "cuda" } else { engine.backend_kind().name() };
    if r.n_prompt > 0 {
        println!("| {name} | {backend} | {} | pp{} | {:.2} |", r.threads, r.n_prompt, r.prefill_tok_s);
    }
    if r.n_gen > 0 {
        println!("| {name} | {backend} | {} | tg{} | {:.2} |", r.threads, r.n_gen, r.decode_tok_s);
    }
    if let (Some(n), Some(agg)) = (r.parallel, r.aggregate_decode_tok_s) {
        println!("| {name} | {backend} | {} | tg{} x{n} sequences | {agg:.2} |", r.threads, r.n_gen);
    }
    println!(
        "\nload {:.0} ms, cold start to first token {:.0} ms, peak RSS {:.1} MiB, median of {} repetitions",
        r.load_ms,
        r.cold_start_ms,
        r.peak_rss_bytes as f64 / (1 << 20) as f64,
        r.reps
    );
    if let Some(s) = &schedule {
        println!("{}", super::isa_line(s.isa, a.model.isa.isa.is_some()));
        if let Some(line) = super::ternary_line(s) {
            println!("{line}");
        }
    }
    println!("KV cache: {}", r.cache_type);
    if let Some(c) = &r.cpu {
        println!(
            "decode reads {:.3} GB of weights a token ({} head); read bandwidth here {:.1} GB/s: {:.0}% of that roofline",
            c.bytes_per_token as f64 / 1e9,
            r.head.as_deref().unwrap_or("stored"),
            c.bandwidth_gbs,
            100.0 * c.roofline_fraction
        );
    }
    if let Some(k) = &r.prefill_kernel_ms {
        println!("one prefill of {}, kernel by kernel, ms (calls): {k}", r.n_prompt.max(1));
    }
    if let Some(k) = &r.decode_kernel_ms {
        println!("a decode step (the mean of up to {}), kernel by kernel, ms (calls): {k}", bench::PROFILED_STEPS);
    }
    if let (Some(n), Some(k)) = (r.parallel, &r.parallel_kernel_ms) {
        println!("one decode step of {n} sequences, kernel by kernel, ms (calls): {k}");
    }
    if let Some(g) = &r.gpu {
        println!(
            "{}: {:.2} GB of weights read per token, copy bandwidth {:.0} GB/s: decode at {:.0}% of that roofline, {} kernel launches a decode step",
            g.device,
            g.weight_bytes as f64 / 1e9,
            g.bandwidth_gb_s,
            100.0 * g.decode_roofline,
            g.decode_launches
        );
        if let Some(e) = &g.cuda_graph_error {
            println!("{e}");
        }
    }
    Ok(())
}
