//! Generation on an engine: one sequence at a time ([`Engine::generate`])
//! or many prompts batched together ([`Engine::generate_batch`]), each
//! sequence joining as another leaves.

use crate::engine::{Engine, Sequence};
use crate::error::RuntimeError;
use crate::kv::BLOCK_POSITIONS;
use crate::sampler::{Sampler, SamplerConfig};
use crate::stops::StopFilter;
use bitnet_frontends::tokenizer::TextStream;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub n_predict: usize,
    pub ignore_eos: bool,
    pub sampler: SamplerConfig,
    /// Keep the logits of every evaluated position.
    pub dump_logits: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StopReason {
    #[default]
    Length,
    EndOfGeneration,
    ContextFull,
}

impl StopReason {
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Length => "length",
            StopReason::EndOfGeneration => "end of text",
            StopReason::ContextFull => "context full",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    /// Rows of logits (with `dump_logits`): the prompt positions, then one
    /// per generated token that was fed back.
    pub logits: Vec<f32>,
    /// Prompt tokens taken from the prefix cache, not computed.
    pub cached_tokens: usize,
    pub prefill_ms: f64,
    /// Time from the first sampled token to the end.
    pub decode_ms: f64,
    /// Tokens evaluated one at a time after the prompt.
    pub decoded: usize,
    pub stop: StopReason,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prompt_ids.len() - self.cached_tokens.min(self.prompt_ids.len()), self.prefill_ms)
    }
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.decoded, self.decode_ms)
    }
}

fn rate(n: usize, ms: f64) -> f64 {
    if n == 0 || ms <= 0.0 {
        0.0
    } else {
        n as f64 / (ms / 1e3)
    }
}

/// Prompt rows [`Engine::generate_batch`] feeds a step, all sequences
/// together (decode rows count too; every prefilling sequence gets at least
/// a small chunk): a step's activations stay small beside the weights and
/// the KV cache however many long prompts start at once, and the steps
/// stay large enough for the products to run at full speed.
pub const BATCH_STEP_TOKENS: usize = 512;

/// Rows a prefilling sequence gets in a step even when the budget is spent.
const MIN_CHUNK: usize = 16;

/// The part of a prompt a sequence has yet to feed: a batch feeds long
/// prompts a chunk a step ([`feed_prompt_chunks`]), so that one long prompt
/// neither holds back the others' decode rows for long nor makes a step's
/// activations large.
#[derive(Debug, Default)]
pub struct PromptRest(Vec<u32>);

impl PromptRest {
    /// Starts `prompt` on `seq`: what the engine's prefix cache holds of it
    /// is reused, the rest is held back. Returns the rest and how many
    /// tokens were reused.
    pub fn start(engine: &Engine, seq: &mut Sequence, prompt: &[u32]) -> (PromptRest, usize) {
        let reused = engine.reuse_prefix(seq, prompt);
        (PromptRest(prompt[reused..].to_vec()), reused)
    }

    /// True once the whole prompt went in.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `own`, the prompt this is the rest of, has yet to feed some
    /// of the whole cache blocks that `prompt` starts with. A sequence
    /// about to start `prompt` does better to wait: once `own`'s steps have
    /// computed those blocks they are in the prefix cache, for
    /// [`PromptRest::start`] to take rather than compute them twice (a
    /// request's several choices, requests that open with one long system
    /// prompt).
    pub fn still_feeds_prefix_of(&self, own: &[u32], prompt: &[u32]) -> bool {
        // As `Engine::reuse_prefix`, which leaves the last token to compute.
        let reusable = &prompt[..prompt.len().saturating_sub(1)];
        let shared = reusable.iter().zip(own).take_while(|(a, b)| a == b).count() / BLOCK_POSITIONS * BLOCK_POSITIONS;
        let fed = own.len() - self.0.len();
        fed < shared
    }
}

/// Feeds one step's prompt chunks: `budget` rows in all, the decode rows
/// (sequences whose prompt is all in) counted first, then each prefilling
/// sequence in order takes what is left (at least [`MIN_CHUNK`]).
pub fn feed_prompt_chunks<'a>(budget: usize, batch: impl IntoIterator<Item = (&'a mut PromptRest, &'a mut Sequence)>) {
    let batch: Vec<_> = batch.into_iter().collect();
    let mut budget = budget.saturating_sub(batch.iter().filter(|(rest, _)| rest.is_empty()).count());
    for (rest, seq) in batch.into_iter().filter(|(rest, _)| !rest.is_empty()) {
        let n = rest.0.len().min(budget.max(MIN_CHUNK));
        seq.feed(&rest.0[..n]);
        rest.0.drain(..n);
        budget = budget.saturating_sub(n);
    }
}

/// One generation in progress: after each step, take the next token.
struct Live {
    seq: Sequence,
    /// Prompt tokens not yet fed (the batch feeds long prompts in chunks).
    rest: PromptRest,
    gen: Generation,
    opts: GenerateOptions,
    started: Instant,
    decoding: Option<Instant>,
}

enum Next {
    /// Part of the prompt went in; more of it is to come.
    Prefilling,
    /// Fed the token it chose; goes on.
    Fed(u32),
    /// Chose its last token (if any).
    Done(Option<u32>),
}

impl Live {
    /// `seq` samples with its sampler, made from `opts.sampler` ([`Engine::sampler`]).
    fn new(mut seq: Sequence, prompt: &[u32], opts: &GenerateOptions) -> Live {
        seq.keep_all_logits = opts.dump_logits;
        seq.feed(prompt);
        Live {
            seq,
            rest: PromptRest::default(),
            gen: Generation { prompt_ids: prompt.to_vec(), ..Default::default() },
            opts: opts.clone(),
            started: Instant::now(),
            decoding: None,
        }
    }

    /// As [`Live::new`], with the prompt held back to be fed a chunk at a
    /// time, after whatever of it the engine's prefix cache holds.
    fn chunked(engine: &Engine, mut seq: Sequence, prompt: &[u32], opts: &GenerateOptions) -> Live {
        let (rest, _) = PromptRest::start(engine, &mut seq, prompt);
        let mut live = Live::new(seq, &[], opts);
        live.gen.prompt_ids = prompt.to_vec();
        live.rest = rest;
        live
    }

    /// After a step: records it, then samples and feeds the next token
    /// (or, while the prompt is still going in, keeps its logits if asked).
    fn advance(&mut self, engine: &Engine) -> Next {
        if !self.rest.is_empty() {
            if self.opts.dump_logits {
                self.gen.logits.extend_from_slice(self.seq.logits());
            }
            return Next::Prefilling;
        }
        let now = Instant::now();
        match self.decoding {
            None => {
                self.gen.prefill_ms = (now - self.started).as_secs_f64() * 1e3;
                self.gen.cached_tokens = self.seq.cached_tokens();
                self.decoding = Some(now);
            }
            Some(_) => self.gen.decoded += 1,
        }
        if self.opts.dump_logits {
            self.gen.logits.extend_from_slice(self.seq.logits());
        }
        if self.gen.generated_ids.len() >= self.opts.n_predict {
            return Next::Done(None);
        }
        let next = self.seq.sample().expect("a step gives logits");
        self.gen.generated_ids.push(next);
        if !self.opts.ignore_eos && engine.tokenizer.is_eog(next) {
            self.gen.stop = StopReason::EndOfGeneration;
            return Next::Done(Some(next));
        }
        if self.gen.generated_ids.len() >= self.opts.n_predict {
            return Next::Done(Some(next));
        }
        if self.seq.tokens().len() >= engine.context {
            self.gen.stop = StopReason::ContextFull;
            return Next::Done(Some(next));
        }
        self.seq.feed(&[next]);
        Next::Fed(next)
    }

    fn finish(mut self) -> (Sequence, Generation) {
        if let Some(t) = self.decoding {
            self.gen.decode_ms = t.elapsed().as_secs_f64() * 1e3;
        }
        (self.seq, self.gen)
    }
}

impl Engine {
    /// Generates up to `opts.n_predict` tokens after `prompt` (fed after
    /// what `seq` holds), calling `on_token` with each as it is chosen.
    pub fn generate(&self, seq: &mut Sequence, prompt: &[u32], opts: &GenerateOptions, mut on_token: impl FnMut(u32)) -> Result<Generation, RuntimeError> {
        if prompt.is_empty() {
            return RuntimeError::input("nothing to evaluate: the prompt is empty");
        }
        let sampler = self.sampler(opts.sampler.clone())?;
        if prompt.len() + seq.tokens().len() > self.context {
            return RuntimeError::input(format!(
                "the prompt is {} tokens, longer than the {} the context has left (context size {}; raise it with -c)",
                prompt.len(),
                self.context - seq.tokens().len(),
                self.context
            ));
        }
        let placeholder = self.sequence_with(Sampler::free(SamplerConfig::default()));
        let mut taken = std::mem::replace(seq, placeholder);
        taken.sampler = sampler;
        let mut live = Live::new(taken, prompt, opts);
        let result = loop {
            if let Err(e) = self.step_one(&mut live.seq) {
                break Err(e);
            }
            match live.advance(self) {
                Next::Prefilling => {}
                Next::Fed(t) => on_token(t),
                Next::Done(t) => {
                    t.into_iter().for_each(&mut on_token);
                    break Ok(());
                }
            }
        };
        let (back, gen) = live.finish();
        *seq = back;
        result.map(|()| gen)
    }

    /// Generates for every prompt, up to `parallel` sequences at once in
    /// each step; a finished sequence makes room for the next prompt.
    /// Prompts go in by chunks, [`BATCH_STEP_TOKENS`] rows a step at most
    /// beside the decode rows.
    /// A prompt that opens with whole KV blocks of one still going in
    /// waits for them (then taken from the prefix cache, not computed
    /// again). `on_done` hears each result with its prompt's index, in the
    /// order they finish; one prompt's error does not stop the others.
    pub fn generate_batch(&self, prompts: &[(Vec<u32>, GenerateOptions)], parallel: usize, mut on_done: impl FnMut(usize, Result<Generation, RuntimeError>)) {
        let mut queue = prompts.iter().enumerate().peekable();
        let mut live: Vec<(usize, Live)> = Vec::new();
        loop {
            while live.len() < parallel.max(1) {
                let Some(&(_, (next, _))) = queue.peek() else { break };
                if live.iter().any(|(j, l)| l.rest.still_feeds_prefix_of(&prompts[*j].0, next)) {
                    break;
                }
                let Some((i, (prompt, opts))) = queue.next() else { break };
                if prompt.is_empty() {
                    on_done(i, RuntimeError::input("nothing to evaluate: the prompt is empty"));
                    continue;
                }
                match self.sampler(opts.sampler.clone()) {
                    Ok(s) => live.push((i, Live::chunked(self, self.sequence_with(s), prompt, opts))),
                    Err(e) => on_done(i, Err(e)),
                }
            }
            if live.is_empty() {
                return;
            }
            feed_prompt_chunks(BATCH_STEP_TOKENS, live.iter_mut().map(|(_, l)| (&mut l.rest, &mut l.seq)));
            let results = {
                let mut seqs: Vec<&mut Sequence> = live.iter_mut().map(|(_, l)| &mut l.seq).collect();
                self.step(&mut seqs)
            };
            let mut k = 0;
            for r in results {
                let next = r.map(|()| live[k].1.advance(self));
                match next {
                    Ok(Next::Fed(_) | Next::Prefilling) => k += 1,
                    Ok(Next::Done(_)) => {
                        let (i, l) = live.remove(k);
                        on_done(i, Ok(l.finish().1));
                    }
                    Err(e) => {
                        let (i, _) = live.remove(k);
                        on_done(i, Err(e));
                    }
                }
            }
        }
    }
}

/// One text generation pulled a token at a time, for callers that stream
/// it and may stop between tokens (the language bindings): each
/// [`next_piece`](TextGeneration::next_piece) evaluates one step, chooses
/// the next token as [`Engine::generate`] does and returns the text that
/// became printable; text that could still start a stop string is held
/// back. Dropping it frees the sequence's cache.
pub struct TextGeneration {
    engine: Arc<Engine>,
    seq: Sequence,
    prompt_last: Option<u32>,
    generated: Vec<u32>,
    text: TextStream,
    stops: StopFilter,
    max_tokens: usize,
    ignore_eos: bool,
    stopped: bool,
    done: bool,
}

impl TextGeneration {
    /// Checks `prompt` (used verbatim) and queues it on a new sequence.
    pub fn start(engine: Arc<Engine>, prompt: &[u32], opts: &GenerateOptions, stop: Vec<String>) -> Result<TextGeneration, RuntimeError> {
        if prompt.is_empty() {
            return RuntimeError::input("the prompt is empty: nothing to generate from");
        }
        if prompt.len() >= engine.context {
            return Err(RuntimeError::TooLong(format!(
                "the prompt is {} tokens; the context holds {}, with room for at least one generated token",
                prompt.len(),
                engine.context
            )));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= engine.vocab()) {
            return RuntimeError::input(format!("token id {bad} is outside the vocabulary of {}", engine.vocab()));
        }
        let mut seq = engine.sequence_with(engine.sampler(opts.sampler.clone())?);
        seq.keep_all_logits = opts.dump_logits;
        seq.feed(prompt);
        let text = TextStream::new(engine.tokenizer.clone(), prompt.last().copied());
        Ok(TextGeneration {
            engine,
            seq,
            prompt_last: prompt.last().copied(),
            generated: Vec::new(),
            text,
            stops: StopFilter::new(stop),
            max_tokens: opts.n_predict,
            ignore_eos: opts.ignore_eos,
            stopped: false,
            done: opts.n_predict == 0,
        })
    }

    /// One step: the text that became printable (maybe empty), or `None`
    /// once the generation is over.
    pub fn next_piece(&mut self) -> Result<Option<String>, RuntimeError> {
        if self.done {
            return Ok(None);
        }
        self.engine.step_one(&mut self.seq)?;
        let id = self.seq.sample().ok_or_else(|| RuntimeError::Input("the step gave no logits".into()))?;
        self.generated.push(id);
        let end =
            (!self.ignore_eos && self.engine.tokenizer.is_eog(id)) || self.generated.len() >= self.max_tokens || self.seq.tokens().len() >= self.engine.context;
        let (piece, stopped) = self.stops.push(&self.text.push(id));
        self.stopped = stopped;
        if end || stopped {
            self.done = true;
        } else {
            self.seq.feed(&[id]);
        }
        Ok(Some(piece))
    }

    /// What is left once [`next_piece`](Self::next_piece) has said the
    /// generation is over (nothing after a stop string).
    pub fn rest(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let (piece, stopped) = self.stops.push(&self.text.finish());
        self.stopped = stopped;
        if stopped {
            piece
        } else {
            piece + &self.stops.finish()
        }
    }

    /// Runs to the end, each step through `step` (which calls
    /// [`next_piece`](Self::next_piece), and may do more around it: release
    /// a lock, check for an interrupt); the text (exactly `bitnet run
    /// --json`'s when no stop string was met) and the generated ids.
    pub fn finish<E>(mut self, mut step: impl FnMut(&mut Self) -> Result<Option<String>, E>) -> Result<(String, Vec<u32>), E> {
        let mut out = String::new();
        while let Some(piece) = step(&mut self)? {
            out += &piece;
        }
        out += &self.rest();
        if !self.stopped {
            out = self.engine.tokenizer.decode(self.prompt_last, &self.generated);
        }
        Ok((out, self.generated))
    }

    /// The sequence: its logits after a step (with `dump_logits`).
    pub fn sequence(&self) -> &Sequence {
        &self.seq
    }

    /// Evaluates what is pending without choosing a token (the prompt's
    /// logits).
    pub fn evaluate(&mut self) -> Result<(), RuntimeError> {
        self.engine.step_one(&mut self.seq)
    }

    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    pub fn is_done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prompt waits for one being fed only while whole blocks they share
    /// are still to be computed.
    #[test]
    fn a_prompt_waits_only_for_shared_blocks_not_yet_fed() {
        let own: Vec<u32> = (0..40).collect();
        let rest = |fed: usize| PromptRest(own[fed..].to_vec());
        let same_start: Vec<u32> = (0..35).chain([99, 98]).collect();
        // Two whole blocks shared (32 tokens).
        assert!(rest(0).still_feeds_prefix_of(&own, &same_start));
        assert!(rest(31).still_feeds_prefix_of(&own, &same_start));
        assert!(!rest(32).still_feeds_prefix_of(&own, &same_start));
        // Less than a block shared, or nothing: no reason to wait.
        let short: Vec<u32> = (0..15).chain([7]).collect();
        assert!(!rest(0).still_feeds_prefix_of(&own, &short));
        assert!(!rest(0).still_feeds_prefix_of(&own, &[5; 40]));
        // The same prompt: all its whole blocks but the last token's.
        assert!(rest(16).still_feeds_prefix_of(&own, &own));
        assert!(!rest(32).still_feeds_prefix_of(&own, &own));
        assert!(!rest(0).still_feeds_prefix_of(&own, &[]));
    }
}
