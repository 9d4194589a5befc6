//! Generation on an engine: one sequence at a time ([`Engine::generate`])
//! or many prompts batched together ([`Engine::generate_batch`]), each
//! sequence joining as another leaves.

use crate::engine::{Engine, Sequence};
use crate::error::RuntimeError;
use crate::sampler::{Sampler, SamplerConfig};
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

/// One generation in progress: after each step, take the next token.
struct Live {
    seq: Sequence,
    gen: Generation,
    opts: GenerateOptions,
    started: Instant,
    decoding: Option<Instant>,
}

enum Next {
    /// Fed the token it chose; goes on.
    Fed(u32),
    /// Chose its last token (if any).
    Done(Option<u32>),
}

impl Live {
    fn new(mut seq: Sequence, prompt: &[u32], opts: &GenerateOptions) -> Live {
        seq.sampler = Sampler::new(opts.sampler.clone());
        seq.keep_all_logits = opts.dump_logits;
        seq.feed(prompt);
        Live { seq, gen: Generation { prompt_ids: prompt.to_vec(), ..Default::default() }, opts: opts.clone(), started: Instant::now(), decoding: None }
    }

    /// After a step: records it, then samples and feeds the next token.
    fn advance(&mut self, engine: &Engine) -> Next {
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
        if prompt.len() + seq.tokens().len() > self.context {
            return RuntimeError::input(format!(
                "the prompt is {} tokens, longer than the {} the context has left (context size {}; raise it with -c)",
                prompt.len(),
                self.context - seq.tokens().len(),
                self.context
            ));
        }
        let placeholder = self.new_sequence(opts.sampler.clone());
        let mut live = Live::new(std::mem::replace(seq, placeholder), prompt, opts);
        let result = loop {
            if let Err(e) = self.step_one(&mut live.seq) {
                break Err(e);
            }
            match live.advance(self) {
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
    /// `on_done` hears each result with its prompt's index, in the order
    /// they finish; one prompt's error does not stop the others.
    pub fn generate_batch(&self, prompts: &[(Vec<u32>, GenerateOptions)], parallel: usize, mut on_done: impl FnMut(usize, Result<Generation, RuntimeError>)) {
        let mut queue = prompts.iter().enumerate();
        let mut live: Vec<(usize, Live)> = Vec::new();
        loop {
            while live.len() < parallel.max(1) {
                let Some((i, (prompt, opts))) = queue.next() else { break };
                if prompt.is_empty() {
                    on_done(i, RuntimeError::input("nothing to evaluate: the prompt is empty"));
                    continue;
                }
                live.push((i, Live::new(self.new_sequence(opts.sampler.clone()), prompt, opts)));
            }
            if live.is_empty() {
                return;
            }
            let results = {
                let mut seqs: Vec<&mut Sequence> = live.iter_mut().map(|(_, l)| &mut l.seq).collect();
                self.step(&mut seqs)
            };
            let mut k = 0;
            for r in results {
                let next = r.map(|()| live[k].1.advance(self));
                match next {
                    Ok(Next::Fed(_)) => k += 1,
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
