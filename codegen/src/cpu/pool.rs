//! A persistent thread pool with cheap dispatch.
//!
//! Decode runs a few hundred kernels per token, so starting a job must cost
//! far less than the job. Workers spin on an epoch counter for a while
//! after each job (the next one usually comes within microseconds), then
//! sleep on a condition variable. The calling thread is worker 0, so a
//! pool of one thread never switches threads at all.
//!
//! Callers on several threads take turns: a job holds the pool from its
//! start to its end (the `caller` lock), so the job slot only ever holds
//! one job and the lifetime it erases outlives every worker's use of it.
//! [`Pool::shared`] hands out one pool per thread count for the whole
//! process, so engines side by side do not each keep cores spinning.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A job: called once per worker with `(worker, workers)`.
type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Below this many multiply-adds a job runs on the calling thread alone
/// ([`Pool::run_sized`]): a dispatch costs a few microseconds.
pub const SMALL_WORK: usize = 1 << 15;

/// How long an idle worker spins before it sleeps.
const SPIN_ROUNDS: u32 = 1 << 16;

struct Shared {
    epoch: AtomicU64,
    /// The current job, its lifetime erased; valid while `pending > 0`.
    job: Mutex<Option<Job<'static>>>,
    pending: AtomicUsize,
    sleepers: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
    /// Held by the thread whose job the pool is running.
    caller: Mutex<()>,
}

impl Pool {
    /// The process's pool of `threads` workers, made on first use and kept
    /// while anyone holds it.
    pub fn shared(threads: usize) -> Arc<Pool> {
        static POOLS: Mutex<Vec<std::sync::Weak<Pool>>> = Mutex::new(Vec::new());
        let threads = threads.max(1);
        let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|p| p.strong_count() > 0);
        if let Some(p) = pools.iter().filter_map(|p| p.upgrade()).find(|p| p.threads == threads) {
            return p;
        }
        let p = Arc::new(Pool::new(threads));
        pools.push(Arc::downgrade(&p));
        p
    }

    /// A pool of `threads` workers, counting the caller.
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads)
            .map(|w| {
                let shared = shared.clone();
                std::thread::Builder::new().name(format!("bitnet-worker-{w}")).spawn(move || worker(&shared, w, threads)).expect("spawning a worker thread")
            })
            .collect();
        Pool { shared, workers, threads, caller: Mutex::new(()) }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// [`Pool::run`], or for less than [`SMALL_WORK`] operations of `work`
    /// only `f(0, 1)` on the calling thread: waking the workers would cost
    /// more than they save (a tiny model's matrices). Kernels split their
    /// work by `(worker, workers)`, so the result is the same.
    pub fn run_sized(&self, work: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        if work < SMALL_WORK {
            return f(0, 1);
        }
        self.run(f)
    }

    /// Runs `f(worker, workers)` on every worker and returns when all are done.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        if self.threads == 1 {
            return f(0, 1);
        }
        // A job running `f` on this pool from inside another job of it would
        // wait for itself: kernels never do that.
        let _turn = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: the job is only reached through `s.job` while `pending`
        // is above zero, and this function does not return before it is 0;
        // `_turn` keeps any other caller from replacing it meanwhile.
        let erased: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(f) };
        *s.job.lock().unwrap() = Some(erased);
        s.pending.store(self.threads - 1, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = s.lock.lock().unwrap();
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0, self.threads)));
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < SPIN_ROUNDS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *s.job.lock().unwrap() = None;
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a worker thread panicked in a kernel");
        }
    }
}

fn worker(s: &Shared, me: usize, workers: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen || s.stop.load(Ordering::Acquire) {
                break e;
            }
            spins += 1;
            if spins < SPIN_ROUNDS {
                std::hint::spin_loop();
                continue;
            }
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            let mut guard = s.lock.lock().unwrap();
            while s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                guard = s.wake.wait(guard).unwrap();
            }
            drop(guard);
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        };
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        seen = epoch;
        let job = *s.job.lock().unwrap();
        if let Some(job) = job {
            if catch_unwind(AssertUnwindSafe(|| job(me, workers))).is_err() {
                s.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap();
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// The share `[start, end)` of `n` items that worker `w` of `workers` takes:
/// contiguous, so each worker streams one stretch of the weights.
pub fn share(n: usize, w: usize, workers: usize) -> std::ops::Range<usize> {
    (n * w / workers)..(n * (w + 1) / workers)
}

/// Hands out pieces of `n` items to whichever worker asks first, so that a
/// worker slowed by the memory system or the OS does not hold the others up
/// at the end of a job. Each piece is contiguous (the weights still stream)
/// and a fixed share of what is left (guided, as OpenMP calls it): large
/// pieces first, then smaller ones, down to a 32nd of a worker's share, so
/// that the last pieces, which one worker may wait on, are short. Which
/// worker computes an item never changes its result.
pub struct Chunks {
    next: AtomicUsize,
    n: usize,
    workers: usize,
    least: usize,
}

impl Chunks {
    pub fn new(n: usize, workers: usize) -> Chunks {
        let workers = workers.max(1);
        Chunks { next: AtomicUsize::new(0), n, workers, least: (n / (workers * 32)).max(1) }
    }

    /// The next piece, `None` when all are handed out.
    pub fn next(&self) -> Option<std::ops::Range<usize>> {
        let mut start = self.next.load(Ordering::Relaxed);
        loop {
            if start >= self.n {
                return None;
            }
            let end = (start + ((self.n - start) / (2 * self.workers)).max(self.least)).min(self.n);
            match self.next.compare_exchange_weak(start, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(start..end),
                Err(now) => start = now,
            }
        }
    }
}

/// A pointer that workers write disjoint parts of.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(pub *mut T);
// SAFETY: workers write disjoint ranges through it (each range handed out
// once by `Chunks`), and the owner reads only after the pool's join.
unsafe impl<T> Send for SharedMut<T> {}
// SAFETY: as for Send: no two workers touch the same element.
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer. (A method, so that closures capture the whole `Sync`
    /// wrapper rather than its raw-pointer field.)
    pub fn ptr(&self) -> *mut T {
        self.0
    }
}

/// The memory's read bandwidth with this pool's workers, in bytes a
/// second: the best of `passes` sums over a buffer of `bytes` (each worker
/// summing its share), the figure a bandwidth-bound decode step is held to.
/// The buffer is held as the weights are ([`super::blob::Blob`]: in huge
/// pages where they are), so that the two are measured alike. Each pass
/// sums the buffer twice, with and without software prefetch as the decode
/// kernels use it ([`super::prefetch_stream`]): where the hardware
/// prefetcher alone leaves the loads waiting on DRAM (an Intel Xeon VM:
/// 28-31 GB/s with a prefetch into L1, 18-24 without), the kernels read
/// faster than a plain sum, and the roofline is the faster of the two.
/// (Without a prefetch instruction, off x86, both sums are plain.)
pub fn read_bandwidth(pool: &Pool, bytes: usize, passes: usize) -> f64 {
    let data = super::blob::Blob::from_fn(bytes / 8, |i| i as u64);
    let mut best = f64::INFINITY;
    for prefetch in (0..passes.max(1)).flat_map(|_| [false, true]) {
        let total = std::sync::atomic::AtomicU64::new(0);
        let t0 = std::time::Instant::now();
        pool.run(&|me, n| {
            let part = &data[share(data.len(), me, n)];
            let s = part.chunks_exact(8).fold([0u64; 8], |mut acc, c| {
                if prefetch {
                    super::prefetch_stream::<1>(c.as_ptr() as *const u8);
                }
                for i in 0..8 {
                    acc[i] = acc[i].wrapping_add(c[i]);
                }
                acc
            });
            total.fetch_add(s.iter().fold(0, |a, &b| a.wrapping_add(b)), std::sync::atomic::Ordering::Relaxed);
        });
        std::hint::black_box(total.into_inner());
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (data.len() * 8) as f64 / best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_runs_every_job_once() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads);
            let count = AtomicUsize::new(0);
            for _ in 0..1000 {
                pool.run(&|_, n| {
                    assert_eq!(n, threads);
                    count.fetch_add(1, Ordering::Relaxed);
                });
            }
            assert_eq!(count.load(Ordering::Relaxed), 1000 * threads);
        }
    }

    /// Four threads share one pool, each running its own jobs: every job
    /// runs on every worker exactly once, and none sees another's.
    #[test]
    fn concurrent_callers_take_turns() {
        let pool = Pool::shared(2);
        assert!(Arc::ptr_eq(&pool, &Pool::shared(2)));
        std::thread::scope(|scope| {
            for t in 0..4usize {
                let pool = &pool;
                scope.spawn(move || {
                    for i in 0..500usize {
                        let tag = t * 1000 + i;
                        let seen = AtomicUsize::new(0);
                        pool.run(&|_, _| {
                            std::hint::black_box(tag);
                            seen.fetch_add(tag + 1, Ordering::Relaxed);
                        });
                        assert_eq!(seen.load(Ordering::Relaxed), 2 * (tag + 1));
                    }
                });
            }
        });
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let pool = Pool::new(2);
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn chunks_cover_everything_once() {
        for n in [0, 1, 7, 100, 128256] {
            for threads in 1..4 {
                let pool = Pool::new(threads);
                let chunks = Chunks::new(n, threads);
                let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(&|_, _| {
                    while let Some(r) = chunks.next() {
                        r.for_each(|i| {
                            seen[i].fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
                assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1), "n={n} threads={threads}");
            }
        }
    }

    #[test]
    fn chunks_shrink_to_short_last_pieces() {
        let n = 128256;
        let chunks = Chunks::new(n, 2);
        let pieces: Vec<usize> = std::iter::from_fn(|| chunks.next()).map(|r| r.len()).collect();
        assert_eq!(pieces[0], n / 4, "{pieces:?}");
        assert!(pieces.windows(2).all(|w| w[1] <= w[0]), "{pieces:?}");
        assert!(*pieces.last().unwrap() <= n / 64 && pieces.len() < 24, "{pieces:?}");
    }

    #[test]
    fn shares_cover_everything_once() {
        for n in [0, 1, 7, 100] {
            for workers in 1..5 {
                let total: usize = (0..workers).map(|w| share(n, w, workers).len()).sum();
                assert_eq!(total, n);
            }
        }
    }
}
