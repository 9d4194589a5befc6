//! Choosing the next token from logits, in llama.cpp's order: repeat
//! penalty over the last N tokens, then top-k, top-p, min-p, temperature,
//! and a draw from the seeded generator. Temperature 0 is greedy.

use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    /// llama.cpp's defaults.
    fn default() -> Self {
        SamplerConfig { temperature: 0.8, top_k: 40, top_p: 0.95, min_p: 0.05, repeat_penalty: 1.0, repeat_last_n: 64, seed: 0 }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig { temperature: 0.0, ..Default::default() }
    }
}

pub struct Sampler {
    pub config: SamplerConfig,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Sampler {
        let rng = rand::rngs::StdRng::seed_from_u64(config.seed);
        Sampler { config, rng }
    }

    /// Picks a token; `history` is every token so far (prompt and output).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let c = &self.config;
        let mut logits = logits.to_vec();
        if c.repeat_penalty != 1.0 && c.repeat_last_n > 0 {
            let from = history.len().saturating_sub(c.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[from..] {
                if let Some(l) = logits.get_mut(t as usize) {
                    if seen.insert(t) {
                        *l = if *l <= 0.0 { *l * c.repeat_penalty } else { *l / c.repeat_penalty };
                    }
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

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative_logits() {
        let cfg = SamplerConfig { repeat_penalty: 2.0, ..SamplerConfig::greedy() };
        let mut s = Sampler::new(cfg);
        // Token 1 (3.0) is penalized to 1.5, below token 2 (2.0).
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[1]), 2);
        // Outside the window it is not.
        let mut s = Sampler::new(SamplerConfig { repeat_last_n: 1, ..s.config.clone() });
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[1, 0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect();
        let mut s = Sampler::new(SamplerConfig { top_k: 1, temperature: 1.0, ..Default::default() });
        assert_eq!(s.sample(&logits, &[]), argmax(&logits));
        let draw = |seed| {
            let mut s = Sampler::new(SamplerConfig { seed, temperature: 1.5, top_k: 0, top_p: 1.0, min_p: 0.0, ..Default::default() });
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
            let mut s = Sampler::new(SamplerConfig { seed, min_p: 0.5, top_p: 1.0, top_k: 0, temperature: 5.0, ..Default::default() });
            assert_eq!(s.sample(&logits, &[]), 0);
            let mut s = Sampler::new(SamplerConfig { seed, min_p: 0.0, top_p: 0.5, top_k: 0, temperature: 5.0, ..Default::default() });
            assert_eq!(s.sample(&logits, &[]), 0);
        }
    }
}
