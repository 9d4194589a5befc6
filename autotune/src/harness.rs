//! The measuring harness: check every candidate against the reference
//! interpreter, then time the ones that are right by successive halving
//! inside a deadline.
//!
//! A wrong candidate is recorded as wrong and never timed, so it can never
//! be chosen. The heuristic's candidate (the first) is always timed first,
//! so however short the budget, the winner is at worst the default.

use bitnet_codegen::schedule::Tiles;
use std::time::{Duration, Instant};

/// One kernel workload, runnable with any of its candidates.
pub trait Kernel {
    /// Runs `tiles` once on small inputs and compares the result with the
    /// reference interpreter's.
    fn check(&mut self, tiles: &Tiles) -> Result<(), String>;
    /// Runs `tiles` once on the timed inputs.
    fn run(&mut self, tiles: &Tiles);
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Median of `runs` timed runs.
    Timed { ns: u64, runs: usize },
    /// Its result disagreed with the reference (or it failed to run).
    Wrong(String),
    /// Right, but the budget ran out before it was timed.
    NotTimed,
}

#[derive(Clone, Debug)]
pub struct Measured {
    pub tiles: Tiles,
    pub outcome: Outcome,
}

impl Measured {
    pub fn ns(&self) -> Option<u64> {
        match self.outcome {
            Outcome::Timed { ns, .. } => Some(ns),
            _ => None,
        }
    }
}

/// The fastest timed candidate, if any was timed.
pub fn best(ms: &[Measured]) -> Option<&Measured> {
    ms.iter().filter(|m| m.ns().is_some()).min_by_key(|m| m.ns())
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Checks then times `candidates` (the first is the default) until
/// `deadline`. Rounds of successive halving: the survivors take `reps`
/// turns each, the slower half is dropped, `reps` doubles. A candidate
/// whose first run is 4× slower than the best so far is dropped at once.
pub fn sweep(kernel: &mut dyn Kernel, candidates: &[Tiles], deadline: Instant) -> Vec<Measured> {
    let mut out: Vec<Measured> = candidates.iter().map(|&tiles| Measured { tiles, outcome: Outcome::NotTimed }).collect();
    for m in &mut out {
        if let Err(e) = kernel.check(&m.tiles) {
            m.outcome = Outcome::Wrong(e);
        }
    }
    let mut times: Vec<Vec<u64>> = vec![Vec::new(); out.len()];
    let mut alive: Vec<usize> = (0..out.len()).filter(|&i| out[i].outcome == Outcome::NotTimed).collect();
    if let Some(&first) = alive.first() {
        kernel.run(&out[first].tiles); // warm-up: page in, wake the pool
    }
    let mut reps = 2;
    while !alive.is_empty() {
        // Candidates take turns, one run each, so that a machine whose
        // speed drifts favours none of them.
        let mut dropped = vec![false; out.len()];
        'rounds: for r in 0..reps {
            let mut best_first = u64::MAX;
            for &i in &alive {
                if dropped[i] {
                    continue;
                }
                if Instant::now() >= deadline && !(i == alive[0] && times[i].is_empty()) {
                    break 'rounds;
                }
                let t0 = Instant::now();
                kernel.run(&out[i].tiles);
                let ns = t0.elapsed().as_nanos() as u64;
                times[i].push(ns);
                // A candidate 4× slower than the best on the first turn goes now.
                if r == 0 && ns > best_first.saturating_mul(4) {
                    dropped[i] = true;
                }
                best_first = best_first.min(ns);
            }
        }
        alive.retain(|&i| !times[i].is_empty());
        for &i in &alive {
            out[i].outcome = Outcome::Timed { ns: median(&mut times[i].clone()), runs: times[i].len() };
        }
        if alive.len() <= 1 || Instant::now() >= deadline {
            break;
        }
        alive.sort_by_key(|&i| out[i].ns());
        let keep = alive.len().div_ceil(2);
        // The 4× rule: a candidate that lost badly on its first run goes now.
        let lead = out[alive[0]].ns().unwrap_or(u64::MAX);
        alive.truncate(keep);
        alive.retain(|&i| out[i].ns().unwrap_or(u64::MAX) <= lead.saturating_mul(4));
        reps *= 2;
    }
    out
}

/// Times the candidates at `finalists` (indices into `measured`) against
/// each other again, taking turns `rounds` times, and keeps each one's
/// median: a sweep drops candidates after two runs, and two runs of a
/// memory-bound product on a shared machine can be far apart.
pub fn rematch(kernel: &mut dyn Kernel, measured: &mut [Measured], finalists: &[usize], rounds: usize) {
    let mut times: Vec<Vec<u64>> = vec![Vec::new(); finalists.len()];
    for _ in 0..rounds {
        for (t, &i) in times.iter_mut().zip(finalists) {
            let t0 = Instant::now();
            kernel.run(&measured[i].tiles);
            t.push(t0.elapsed().as_nanos() as u64);
        }
    }
    for (t, &i) in times.iter_mut().zip(finalists) {
        if !t.is_empty() {
            measured[i].outcome = Outcome::Timed { ns: median(t), runs: t.len() };
        }
    }
}

/// Parses a budget: `90s`, `2m`, `1m30s`, `500ms` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (like 90s, 2m, 1m30s)");
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs)).ok_or_else(bad);
    }
    let (mut total, mut num) = (0f64, String::new());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let unit = match (c, chars.peek()) {
            ('m', Some('s')) => {
                chars.next();
                0.001
            }
            ('h', _) => 3600.0,
            ('m', _) => 60.0,
            ('s', _) => 1.0,
            _ => return Err(bad()),
        };
        total += num.parse::<f64>().map_err(|_| bad())? * unit;
        num.clear();
    }
    if !num.is_empty() || total <= 0.0 || !total.is_finite() {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_codegen::cpu::ternary::TernaryTiles;
    use bitnet_codegen::cpu::Isa;

    fn tiles(rows: usize) -> Tiles {
        Tiles::Ternary(TernaryTiles { isa: Isa::Scalar, rows, tokens: 1, split: Default::default(), packing: Default::default() })
    }

    /// Candidate `rows` sleeps `rows²` × 200 µs (far apart, so that a
    /// loaded machine's hiccups cannot reorder them); rows 1 (the fastest)
    /// computes wrong results.
    struct Fake;
    impl Kernel for Fake {
        fn check(&mut self, t: &Tiles) -> Result<(), String> {
            match t {
                Tiles::Ternary(t) if t.rows == 1 => Err("row 0 differs".into()),
                _ => Ok(()),
            }
        }
        fn run(&mut self, t: &Tiles) {
            let Tiles::Ternary(t) = t else { return };
            std::thread::sleep(Duration::from_micros(200 * (t.rows * t.rows) as u64));
        }
    }

    #[test]
    fn a_wrong_candidate_is_never_chosen() {
        let ms = sweep(&mut Fake, &[tiles(4), tiles(1), tiles(2)], Instant::now() + Duration::from_secs(5));
        assert!(matches!(ms[1].outcome, Outcome::Wrong(_)), "{ms:?}");
        assert_eq!(best(&ms).unwrap().tiles, tiles(2), "{ms:?}");
    }

    /// A rematch times only the finalists, each `rounds` times, and
    /// replaces their two-run medians: a candidate whose sweep runs were
    /// slow (a cold start) gets its place back.
    #[test]
    fn a_rematch_retimes_the_finalists() {
        let mut ms = sweep(&mut Fake, &[tiles(4), tiles(1), tiles(2)], Instant::now() + Duration::from_secs(5));
        ms[0].outcome = Outcome::Timed { ns: 1, runs: 2 };
        rematch(&mut Fake, &mut ms, &[0, 2], 5);
        assert!(matches!(ms[0].outcome, Outcome::Timed { ns, runs: 5 } if ns >= 3_200_000), "{ms:?}");
        assert!(matches!(ms[2].outcome, Outcome::Timed { runs: 5, .. }), "{ms:?}");
        assert!(matches!(ms[1].outcome, Outcome::Wrong(_)), "{ms:?}");
        assert_eq!(best(&ms).unwrap().tiles, tiles(2), "{ms:?}");
    }

    #[test]
    fn the_default_is_timed_even_with_no_budget_left() {
        let ms = sweep(&mut Fake, &[tiles(4), tiles(2)], Instant::now());
        assert!(ms[0].ns().is_some(), "{ms:?}");
        assert_eq!(best(&ms).unwrap().tiles, tiles(4));
    }

    #[test]
    fn durations_parse() {
        for (s, secs) in [("90s", 90.0), ("2m", 120.0), ("1m30s", 90.0), ("500ms", 0.5), ("45", 45.0), ("1h", 3600.0)] {
            assert_eq!(parse_duration(s).unwrap(), Duration::from_secs_f64(secs), "{s}");
        }
        for bad in ["", "s", "-3s", "2x", "1m30", "0s", "nan"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
