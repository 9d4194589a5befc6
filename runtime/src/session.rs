//! One conversation on an engine of its own: the single-sequence
//! convenience over [`Engine`] and [`Sequence`] that `bitnet run`, `chat`
//! and `bench` use. Everything shared lives in the engine (reached
//! through `Deref`); the session adds its one sequence.

use crate::backend::{BackendKind, KernelTimes, LoadOptions};
use crate::engine::{Engine, EngineOptions, Sequence};
use crate::error::RuntimeError;
use crate::generate::{GenerateOptions, Generation};
use crate::sampler::{Sampler, SamplerConfig};
use std::path::Path;
use std::sync::Arc;

pub struct Session {
    engine: Arc<Engine>,
    seq: Sequence,
}

impl std::ops::Deref for Session {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

impl Session {
    /// Loads a model file or folder or a `.bnx` artifact, with a KV
    /// budget of one context.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Session, RuntimeError> {
        let engine = Engine::open(path, &EngineOptions { load: opts.clone(), ..Default::default() })?;
        Ok(Session::new(Arc::new(engine)))
    }

    /// A new sequence on a shared engine.
    pub fn new(engine: Arc<Engine>) -> Session {
        let seq = engine.sequence_with(Sampler::free(SamplerConfig::default()));
        Session { engine, seq }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn sequence(&mut self) -> &mut Sequence {
        &mut self.seq
    }

    pub fn backend(&self) -> BackendKind {
        self.engine.backend_kind()
    }

    /// Tokens in the cache.
    pub fn tokens(&self) -> &[u32] {
        self.seq.tokens()
    }

    pub fn reset(&mut self) {
        self.seq.clear();
    }

    /// Forgets every cached token after the first `n`.
    pub fn rewind(&mut self, n: usize) {
        self.seq.truncate(n);
    }

    /// Evaluates `tokens` after those already cached. Returns logits, one
    /// row of `vocab` per token (`all_logits`) or for the last token only.
    pub fn eval(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, RuntimeError> {
        self.feed(tokens, all_logits)?;
        self.engine.step_one(&mut self.seq)?;
        Ok(self.seq.logits().to_vec())
    }

    /// Evaluates as [`Session::eval`] does, timing each kernel: the
    /// logits, and milliseconds and calls per kernel family, slowest first.
    /// Compiled backends only.
    pub fn profile(&mut self, tokens: &[u32], all_logits: bool) -> Result<(Vec<f32>, KernelTimes), RuntimeError> {
        self.feed(tokens, all_logits)?;
        let times = self.engine.profile(&mut self.seq)?;
        Ok((self.seq.logits().to_vec(), times))
    }

    fn feed(&mut self, tokens: &[u32], all_logits: bool) -> Result<(), RuntimeError> {
        if tokens.is_empty() {
            return RuntimeError::input("nothing to evaluate: the prompt is empty");
        }
        self.seq.keep_all_logits = all_logits;
        self.seq.feed(tokens);
        Ok(())
    }

    /// Generates up to `opts.n_predict` tokens after `prompt`, calling
    /// `on_token` with each as it is chosen.
    pub fn generate(&mut self, prompt: &[u32], opts: &GenerateOptions, on_token: impl FnMut(u32)) -> Result<Generation, RuntimeError> {
        self.engine.generate(&mut self.seq, prompt, opts, on_token)
    }
}
