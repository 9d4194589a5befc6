//! Choosing the next token from logits, in llama.cpp's order: the logit
//! biases, then repeat, presence and frequency penalties over the last N
//! tokens, then top-k, top-p, min-p, temperature, and a draw from the
//! seeded generator. Temperature 0 is greedy (after the biases and penalties).

use crate::constraint::{Constrained, OutputFormat};
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every token in the window
    /// (OpenAI's `presence_penalty`).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it is in the window
    /// (OpenAI's `frequency_penalty`).
    pub frequency_penalty: f32,
    /// Added to a token's logit before anything else (OpenAI's and
    /// llama.cpp's `logit_bias`); `-inf` bans the token. Two entries for
    /// one token add up.
    pub logit_bias: Vec<(u32, f32)>,
    /// What the text must be (a JSON schema), applied after the biases;
    /// `None`: free text.
    pub format: Option<OutputFormat>,
    pub seed: u64,
}

impl Default for SamplerConfig {
    /// llama.cpp's defaults.
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            format: None,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig { temperature: 0.0, ..Default::default() }
    }

    /// The first setting that makes no sense, if any: the temperature must be
    /// finite and ≥ 0, top-p and min-p in [0, 1], the repeat penalty > 0, a
    /// logit bias finite or `-inf`.
    pub fn check(&self) -> Result<(), OutOfRange> {
        let bad = |setting, value: f32| Err(OutOfRange { setting, value });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(Setting::Temperature, self.temperature);
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return bad(Setting::TopP, self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(Setting::MinP, self.min_p);
        }
        if self.repeat_penalty.is_nan() || self.repeat_penalty <= 0.0 {
            return bad(Setting::RepeatPenalty, self.repeat_penalty);
        }
        if let Some(&(_, b)) = self.logit_bias.iter().find(|(_, b)| b.is_nan() || *b == f32::INFINITY) {
            return bad(Setting::LogitBias, b);
        }
        Ok(())
    }

    /// The first token a logit bias names that is not in a vocabulary of
    /// `vocab` tokens, if any.
    pub fn bias_outside(&self, vocab: usize) -> Option<u32> {
        self.logit_bias.iter().map(|&(t, _)| t).find(|&t| t as usize >= vocab)
    }

    /// A seed from the clock, for callers that name none.
    pub fn clock_seed() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    }
}

/// A sampling setting that [`SamplerConfig::check`] bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    Temperature,
    TopP,
    MinP,
    RepeatPenalty,
    LogitBias,
}

impl Setting {
    /// The name the APIs (OpenAI's, Python's, C's, JavaScript's) give it.
    pub fn name(self) -> &'static str {
        match self {
            Setting::Temperature => "temperature",
            Setting::TopP => "top_p",
            Setting::MinP => "min_p",
            Setting::RepeatPenalty => "repeat_penalty",
            Setting::LogitBias => "logit_bias",
        }
    }

    /// The values it may take.
    pub fn range(self) -> &'static str {
        match self {
            Setting::Temperature => "a finite number ≥ 0",
            Setting::TopP | Setting::MinP => "in [0, 1]",
            Setting::RepeatPenalty => "> 0",
            Setting::LogitBias => "a finite number or -inf",
        }
    }
}

/// A sampling setting outside its range, with the value given.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OutOfRange {
    pub setting: Setting,
    pub value: f32,
}

impl OutOfRange {
    /// The message, naming the setting as the caller's interface does.
    pub fn message(&self, name: &str) -> String {
        format!("{name} = {} is out of range: it must be {}", self.value, self.setting.range())
    }
}

impl std::fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message(self.setting.name()))
    }
}

impl std::error::Error for OutOfRange {}

pub struct Sampler {
    pub config: SamplerConfig,
    rng: rand::rngs::StdRng,
    /// Where the text stands in its format's grammar, if it has one.
    constrained: Option<Constrained>,
}

impl Sampler {
    /// A sampler of free text: `config.format` needs the engine's
    /// vocabulary, so a config with one is made by [`crate::Engine::sampler`].
    pub(crate) fn free(config: SamplerConfig) -> Sampler {
        debug_assert!(config.format.is_none(), "a format is compiled by Engine::sampler");
        Sampler::constrained(config, None)
    }

    /// A sampler held to `constrained`, the compiled `config.format`.
    pub(crate) fn constrained(config: SamplerConfig, constrained: Option<Constrained>) -> Sampler {
        let rng = rand::rngs::StdRng::seed_from_u64(config.seed);
        Sampler { config, rng, constrained }
    }

    /// A copy that draws with `seed` from its start: the same settings and
    /// the same place in the format's grammar, so that several generations
    /// (a request's `n` choices) share one compiled format.
    pub fn with_seed(&self, seed: u64) -> Sampler {
        Sampler::constrained(SamplerConfig { seed, ..self.config.clone() }, self.constrained.clone())
    }

    /// Picks a token; `history` is every token so far (prompt and output).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        for &(t, b) in &self.config.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if let Some(c) = &mut self.constrained {
            c.mask(&mut logits);
        }
        let t = self.draw(logits, history);
        if let Some(c) = &mut self.constrained {
            c.advance(t);
        }
        t
    }

    /// The penalties, the cuts and the draw, on biased and masked logits.
    fn draw(&mut self, mut logits: Vec<f32>, history: &[u32]) -> u32 {
        let c = &self.config;
        let penalized = c.repeat_penalty != 1.0 || c.presence_penalty != 0.0 || c.frequency_penalty != 0.0;
        if penalized && c.repeat_last_n > 0 {
            let from = history.len().saturating_sub(c.repeat_last_n);
            let mut counts = std::collections::HashMap::new();
            for &t in &history[from..] {
                *counts.entry(t).or_insert(0u32) += 1;
            }
            for (t, n) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l <= 0.0 { *l * c.repeat_penalty } else { *l / c.repeat_penalty };
                    *l -= c.presence_penalty + n as f32 * c.frequency_penalty;
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(&logits);
        }
        // Candidates sorted by logit, highest first (ties: lower id first).
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if c.top_k > 0 {
            cand.truncate(c.top_k);
        }
        if c.top_p < 1.0 {
            let p = softmax(&cand);
            let mut cum = 0.0;
            let keep = p.iter().position(|&pi| {
                cum += pi;
                cum >= c.top_p
            });
            cand.truncate(keep.map_or(cand.len(), |i| i + 1));
        }
        if c.min_p > 0.0 {
            let p = softmax(&cand);
            let floor = p[0] * c.min_p;
            let keep = p.iter().take_while(|&&pi| pi >= floor).count().max(1);
            cand.truncate(keep);
        }
        for x in &mut cand {
            x.1 /= c.temperature;
        }
        let p = softmax(&cand);
        let r: f32 = self.rng.random();
        let mut cum = 0.0;
        for (i, pi) in p.iter().enumerate() {
            cum += pi;
            if r < cum {
                return cand[i].0;
            }
        }
        cand.last().map_or(0, |x| x.0)
    }
}

/// The log-probability of token `id` under `logits`, and the `top` most
/// likely tokens with theirs (highest first; ties: lower id first).
pub fn logprobs(logits: &[f32], id: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let log_sum = max + logits.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32;
    let lp = |i: u32| logits.get(i as usize).map_or(f32::NEG_INFINITY, |&x| x - log_sum);
    let mut best: Vec<u32> = Vec::with_capacity(top + 1);
    for i in 0..logits.len() as u32 {
        if top == 0 {
            break;
        }
        let at = best.partition_point(|&b| logits[b as usize] >= logits[i as usize]);
        if at < top {
            best.insert(at, i);
            best.truncate(top);
        }
    }
    (lp(id), best.into_iter().map(|i| (i, lp(i))).collect())
}

/// The index of the largest logit (the first one on a tie).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn softmax(cand: &[(u32, f32)]) -> Vec<f32> {
    let max = cand.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.1));
    let e: Vec<f32> = cand.iter().map(|x| (x.1 - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy with another seed draws what a fresh sampler with that seed
    /// draws, whatever the original drew before.
    #[test]
    fn a_reseeded_copy_draws_as_a_fresh_sampler() {
        let config = SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: 1, ..SamplerConfig::default() };
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let draws = |s: &mut Sampler| (0..40).map(|_| s.sample(&logits, &[])).collect::<Vec<u32>>();
        let mut first = Sampler::free(config.clone());
        let before = draws(&mut first);
        let mut copy = first.with_seed(9);
        let mut fresh = Sampler::free(SamplerConfig { seed: 9, ..config });
        let again = draws(&mut copy);
        assert_eq!(again, draws(&mut fresh));
        assert_ne!(again, before, "another seed draws otherwise");
        assert_eq!(copy.config.seed, 9);
    }

    #[test]
    fn check_names_the_first_setting_out_of_range() {
        assert_eq!(SamplerConfig::default().check(), Ok(()));
        let nan = SamplerConfig { temperature: f32::NAN, ..SamplerConfig::default() };
        assert_eq!(nan.check().unwrap_err().setting, Setting::Temperature);
        let cases = [
            (SamplerConfig { temperature: -0.5, ..SamplerConfig::default() }, "temperature = -0.5 is out of range: it must be a finite number ≥ 0"),
            (SamplerConfig { top_p: 1.5, ..SamplerConfig::default() }, "top_p = 1.5 is out of range: it must be in [0, 1]"),
            (SamplerConfig { min_p: -0.1, ..SamplerConfig::default() }, "min_p = -0.1 is out of range: it must be in [0, 1]"),
            (SamplerConfig { repeat_penalty: 0.0, ..SamplerConfig::default() }, "repeat_penalty = 0 is out of range: it must be > 0"),
            (
                SamplerConfig { logit_bias: vec![(1, 2.0), (2, f32::INFINITY)], ..SamplerConfig::default() },
                "logit_bias = inf is out of range: it must be a finite number or -inf",
            ),
            (
                SamplerConfig { logit_bias: vec![(1, f32::NAN)], ..SamplerConfig::default() },
                "logit_bias = NaN is out of range: it must be a finite number or -inf",
            ),
        ];
        for (config, message) in cases {
            assert_eq!(config.check().unwrap_err().to_string(), message);
        }
        let e = SamplerConfig { top_p: 2.0, ..SamplerConfig::default() }.check().unwrap_err();
        assert_eq!(e.message("--top-p"), "--top-p = 2 is out of range: it must be in [0, 1]");
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        let mut s = Sampler::free(SamplerConfig::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative_logits() {
        let cfg = SamplerConfig { repeat_penalty: 2.0, ..SamplerConfig::greedy() };
        let mut s = Sampler::free(cfg);
        // Token 1 (3.0) is penalized to 1.5, below token 2 (2.0).
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[1]), 2);
        // Outside the window it is not.
        let mut s = Sampler::free(SamplerConfig { repeat_last_n: 1, ..s.config.clone() });
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[1, 0]), 1);
    }

    #[test]
    fn presence_and_frequency_penalties_subtract() {
        // Token 1 appears twice: 3.0 - 0.5 - 2 * 0.4 = 1.7 < 2.0.
        let cfg = SamplerConfig { presence_penalty: 0.5, frequency_penalty: 0.4, ..SamplerConfig::greedy() };
        assert_eq!(Sampler::free(cfg.clone()).sample(&[0.1, 3.0, 2.0], &[1, 1]), 2);
        // Once: 3.0 - 0.9 = 2.1 > 2.0.
        assert_eq!(Sampler::free(cfg).sample(&[0.1, 3.0, 2.0], &[1]), 1);
    }

    #[test]
    fn logit_biases_come_first_and_minus_infinity_bans() {
        let logits = [0.1, 3.0, 2.0];
        let biased = |logit_bias: Vec<(u32, f32)>, config: SamplerConfig| Sampler::free(SamplerConfig { logit_bias, ..config }).sample(&logits, &[]);
        // 2.0 + 1.5 = 3.5 > 3.0; two entries for one token add up.
        assert_eq!(biased(vec![(2, 1.5)], SamplerConfig::greedy()), 2);
        assert_eq!(biased(vec![(2, 0.5), (2, 0.6)], SamplerConfig::greedy()), 2);
        assert_eq!(biased(vec![(2, 0.5)], SamplerConfig::greedy()), 1);
        // Banned tokens are never drawn, whatever the seed and temperature.
        let hot = SamplerConfig { temperature: 5.0, top_k: 0, top_p: 1.0, min_p: 0.0, ..SamplerConfig::default() };
        for seed in 0..50 {
            assert_eq!(biased(vec![(1, f32::NEG_INFINITY), (2, f32::NEG_INFINITY)], SamplerConfig { seed, ..hot.clone() }), 0);
        }
        // The bias comes before the penalties: a biased token seen once is
        // penalized from its biased logit (3.0 + 1.0 - 1.5 = 2.5 > 2.0).
        let penalized = SamplerConfig { presence_penalty: 1.5, ..SamplerConfig::greedy() };
        assert_eq!(Sampler::free(SamplerConfig { logit_bias: vec![(1, 1.0)], ..penalized.clone() }).sample(&logits, &[1]), 1);
        assert_eq!(Sampler::free(penalized).sample(&logits, &[1]), 2);
        let c = SamplerConfig { logit_bias: vec![(2, 1.0), (3, 1.0)], ..SamplerConfig::default() };
        assert_eq!((c.bias_outside(3), c.bias_outside(4)), (Some(3), None));
    }

    #[test]
    fn logprobs_are_normalized_and_ranked() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let (lp, top) = logprobs(&logits, 2, 3);
        let total: f32 = logits.iter().map(|&l| (l - logits[1]).exp()).sum();
        assert!((lp - (-1.0 - total.ln())).abs() < 1e-5, "{lp}");
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let sum: f32 = (0..4).map(|i| logprobs(&logits, i, 0).0.exp()).sum();
        assert!((sum - 1.0).abs() < 1e-5);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect();
        let mut s = Sampler::free(SamplerConfig { top_k: 1, temperature: 1.0, ..Default::default() });
        assert_eq!(s.sample(&logits, &[]), argmax(&logits));
        let draw = |seed| {
            let mut s = Sampler::free(SamplerConfig { seed, temperature: 1.5, top_k: 0, top_p: 1.0, min_p: 0.0, ..Default::default() });
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        // One dominant token: min-p 0.5 leaves only it, whatever the draw.
        let logits = [10.0, 0.0, 0.0, 0.0];
        for seed in 0..20 {
            let mut s = Sampler::free(SamplerConfig { seed, min_p: 0.5, top_p: 1.0, top_k: 0, temperature: 5.0, ..Default::default() });
            assert_eq!(s.sample(&logits, &[]), 0);
            let mut s = Sampler::free(SamplerConfig { seed, min_p: 0.0, top_p: 0.5, top_k: 0, temperature: 5.0, ..Default::default() });
            assert_eq!(s.sample(&logits, &[]), 0);
        }
    }
}
