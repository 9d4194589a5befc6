//! Continuous batching: one thread owns the running sequences and steps
//! them through the engine together. A request joins at the next step and
//! leaves when done; a long prompt is fed in chunks, so decode steps of the
//! others go on in between; a request whose client has gone (its event
//! receiver dropped) or whose deadline has passed is dropped at the next
//! step, freeing its cache.

use crate::metrics::Metrics;
use bitnet_frontends::tokenizer::{TextStream, Tokenizer};
use bitnet_runtime::sampler::logprobs;
use bitnet_runtime::{feed_prompt_chunks, Engine, PromptRest, RuntimeError, Sampler, Sequence, StopFilter};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// How one request generates, beside its sampler.
#[derive(Clone, Debug)]
pub struct GenParams {
    /// Already capped to what the context leaves after the prompt.
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// With logprobs: how many alternatives per token.
    pub logprobs: Option<usize>,
    /// Go on past the end-of-generation token (for benchmarks).
    pub ignore_eos: bool,
}

/// A generation to run: its request and its sampler.
pub struct Job {
    pub request: Request,
    /// Made (its format compiled) by the caller, so that a format that
    /// does not compile is the request's error before it is queued.
    pub sampler: Sampler,
}

/// What a running generation keeps of its job (the sequence takes the sampler).
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub events: UnboundedSender<Event>,
    pub deadline: Option<Instant>,
}

/// Why a completion ended: a stop string or the end-of-generation token
/// (`stop`), or the token budget (`length`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub fn name(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug)]
pub enum Event {
    /// A generated token and the text it made printable (possibly none).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Text held back until the end (an incomplete character or a tail
    /// that might have started a stop string).
    Text(String),
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_tokens: usize,
    },
    /// The request failed; `status` is the HTTP status to answer with.
    Error {
        status: u16,
        message: String,
    },
}

/// The handle the HTTP side submits jobs through.
pub struct Scheduler {
    tx: std::sync::Mutex<Option<Sender<Job>>>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Sequences stepped together.
    pub parallel: usize,
    /// Sequences waiting beyond those running (a request of `n` choices
    /// is `n`) before new requests are refused; an empty queue takes any one.
    pub max_queue: usize,
    /// Prompt tokens fed per step across all prefilling sequences (at
    /// least one chunk of a prompt goes in each step).
    pub step_tokens: usize,
}

impl Scheduler {
    pub fn start(engine: Arc<Engine>, cfg: SchedulerConfig, metrics: Arc<Metrics>) -> Scheduler {
        let (tx, rx) = std::sync::mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        let thread = std::thread::Builder::new()
            .name("bitnet-scheduler".into())
            .spawn(move || run(&engine, rx, cfg, &metrics, &q))
            .expect("spawning the scheduler thread");
        Scheduler { tx: std::sync::Mutex::new(Some(tx)), queued, max_queue: cfg.max_queue, thread: std::sync::Mutex::new(Some(thread)) }
    }

    /// Queues a request's jobs (one a choice), all or none; `Err` when the
    /// queue has no room for them all or the server stops. An empty queue
    /// takes a request of more jobs than `--max-queue`.
    pub fn submit(&self, jobs: Vec<Job>) -> Result<(), &'static str> {
        let n = jobs.len();
        // Checked and counted under the lock, so that two requests cannot
        // both take the last room (the scheduler only ever takes jobs off).
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = tx.as_ref() else { return Err("the server is shutting down") };
        if self.queued.load(Ordering::SeqCst) + n > self.max_queue.max(n) {
            return Err("the request queue is full; try again shortly");
        }
        self.queued.fetch_add(n, Ordering::SeqCst);
        for (sent, job) in jobs.into_iter().enumerate() {
            if tx.send(job).is_err() {
                // The scheduler has stopped: the jobs sent are gone with it.
                self.queued.fetch_sub(n - sent, Ordering::SeqCst);
                return Err("the scheduler has stopped");
            }
        }
        Ok(())
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Takes no more jobs; returns once the running ones are done.
    pub fn shutdown(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// A request being served.
struct Running {
    request: Request,
    seq: Sequence,
    /// Prompt tokens not fed yet.
    rest: PromptRest,
    stream: TextStream,
    stops: StopFilter,
    generated: usize,
    started: Instant,
    last_token: Option<Instant>,
}

enum Outcome {
    Going,
    /// Done; `flush`: send the text held back (not after a stop string).
    Finished {
        finish: Finish,
        flush: bool,
    },
    Failed(u16, String),
    Gone,
}

fn run(engine: &Arc<Engine>, rx: Receiver<Job>, cfg: SchedulerConfig, metrics: &Metrics, queued: &AtomicUsize) {
    let tokenizer: Arc<Tokenizer> = engine.tokenizer.clone();
    let mut running: Vec<Running> = Vec::new();
    // Jobs taken from the queue (still counted in `queued`) that wait for
    // a running sequence to feed the prompt blocks they share.
    let mut parked: Vec<Job> = Vec::new();
    let mut open = true;
    loop {
        parked.retain(|j| {
            let keep = !j.request.events.is_closed();
            if !keep {
                queued.fetch_sub(1, Ordering::SeqCst);
            }
            keep
        });
        // Admit: the parked jobs whose blocks are in, then new ones;
        // block when idle.
        while running.len() < cfg.parallel.max(1) {
            let waits = |j: &Job, running: &[Running]| running.iter().any(|r| r.rest.still_feeds_prefix_of(&r.request.prompt, &j.request.prompt));
            let job = if let Some(i) = parked.iter().position(|j| !waits(j, &running)) {
                parked.remove(i)
            } else if !open {
                break;
            } else if running.is_empty() {
                match rx.recv_timeout(Duration::from_millis(250)) {
                    Ok(j) => j,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            if waits(&job, &running) && !job.request.events.is_closed() {
                parked.push(job);
                continue;
            }
            queued.fetch_sub(1, Ordering::SeqCst);
            let Job { request, sampler } = job;
            if request.events.is_closed() {
                continue;
            }
            let mut seq = engine.sequence_with(sampler);
            let (rest, reused) = PromptRest::start(engine, &mut seq, &request.prompt);
            metrics.prefix_cache_tokens.inc_by(reused as u64);
            let stream = TextStream::new(tokenizer.clone(), request.prompt.last().copied());
            let stops = StopFilter::new(request.params.stop.clone());
            running.push(Running { request, seq, rest, stream, stops, generated: 0, started: Instant::now(), last_token: None });
        }
        metrics.set_load(queued.load(Ordering::SeqCst), running.len(), &engine.kv_usage());
        if running.is_empty() {
            if !open && parked.is_empty() {
                return;
            }
            continue;
        }
        // Feed: decode rows first, then prompt chunks within the step's budget.
        feed_prompt_chunks(cfg.step_tokens.max(1), running.iter_mut().map(|r| (&mut r.rest, &mut r.seq)));
        let stepped: Vec<bool> = running.iter().map(|r| !r.seq.pending().is_empty()).collect();
        let results = {
            let mut seqs: Vec<&mut Sequence> = running.iter_mut().map(|r| &mut r.seq).collect();
            catch_unwind(AssertUnwindSafe(|| engine.step(&mut seqs)))
        };
        let outcomes: Vec<Outcome> = match results {
            Err(_) => running.iter().map(|_| Outcome::Failed(500, "internal error: a step panicked; the request was dropped".into())).collect(),
            Ok(results) => running
                .iter_mut()
                .zip(results)
                .zip(stepped)
                .map(|((r, res), stepped)| match res {
                    Err(e) => {
                        let status = if matches!(e, RuntimeError::Input(_) | RuntimeError::KvFull(_)) { 400 } else { 500 };
                        Outcome::Failed(status, e.to_string())
                    }
                    Ok(()) if !stepped || !r.rest.is_empty() => Outcome::Going,
                    Ok(()) => next_token(engine, &tokenizer, r, metrics),
                })
                .collect(),
        };
        let now = Instant::now();
        let mut keep = Vec::with_capacity(running.len());
        for (mut r, outcome) in running.drain(..).zip(outcomes) {
            let outcome = match outcome {
                Outcome::Going if r.request.events.is_closed() => Outcome::Gone,
                Outcome::Going if r.request.deadline.is_some_and(|d| now >= d) => Outcome::Failed(504, "the request timed out (--timeout)".into()),
                o => o,
            };
            match outcome {
                Outcome::Going => keep.push(r),
                Outcome::Finished { finish, flush } => {
                    if flush {
                        let (mut tail, stopped) = r.stops.push(&r.stream.finish());
                        if !stopped {
                            tail += &r.stops.finish();
                        }
                        if !tail.is_empty() {
                            let _ = r.request.events.send(Event::Text(tail));
                        }
                    }
                    let _ = r.request.events.send(Event::Done {
                        finish,
                        prompt_tokens: r.request.prompt.len(),
                        completion_tokens: r.generated,
                        cached_tokens: r.seq.cached_tokens(),
                    });
                    metrics.request_seconds.observe(r.started.elapsed().as_secs_f64());
                }
                Outcome::Failed(status, message) => {
                    let _ = r.request.events.send(Event::Error { status, message });
                }
                Outcome::Gone => {
                    metrics.cancelled.inc();
                }
            }
        }
        running = keep;
    }
}

/// Samples the next token of a sequence whose prompt is in, sends it, and
/// says whether the request is done.
fn next_token(engine: &Engine, tokenizer: &Tokenizer, r: &mut Running, metrics: &Metrics) -> Outcome {
    let Some(id) = r.seq.sample() else { return Outcome::Failed(500, "a step gave no logits".into()) };
    let logprob = r.request.params.logprobs.map(|k| {
        let (lp, top) = logprobs(r.seq.last_logits().unwrap_or(&[]), id, k);
        TokenLogprob { logprob: lp, top }
    });
    let now = Instant::now();
    match r.last_token {
        None => metrics.ttft_seconds.observe((now - r.started).as_secs_f64()),
        Some(t) => metrics.itl_seconds.observe((now - t).as_secs_f64()),
    }
    r.last_token = Some(now);
    r.generated += 1;
    metrics.generated_tokens.inc();
    let piece = r.stream.push(id);
    let (text, stopped) = r.stops.push(&piece);
    if r.request.events.send(Event::Token { id, text, logprob }).is_err() {
        return Outcome::Gone;
    }
    if stopped || (!r.request.params.ignore_eos && tokenizer.is_eog(id)) {
        return Outcome::Finished { finish: Finish::Stop, flush: !stopped };
    }
    if r.generated >= r.request.params.max_tokens || r.seq.tokens().len() >= engine.context {
        return Outcome::Finished { finish: Finish::Length, flush: true };
    }
    r.seq.feed(&[id]);
    Outcome::Going
}
