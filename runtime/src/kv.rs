//! The KV cache's bookkeeping for many sequences: which block belongs to
//! whom, the memory budget, and the prefix cache.
//!
//! The cache is paged (the storage is `bitnet_ir::interp::KvPages`): a
//! fixed number of blocks of [`BLOCK_POSITIONS`] positions, set by the
//! budget when the engine is made. A sequence holds a block table; blocks
//! are reference-counted, so a prefix that several sequences share (a
//! system prompt) is stored once.
//!
//! Every full block a sequence computed is registered under a hash of all
//! the tokens up to its end. A new prompt whose first blocks match takes
//! those blocks instead of computing them again. A block whose last holder
//! is gone keeps its contents, as a cached block, until the space is
//! needed (oldest first): the next request that re-sends the same
//! conversation (as OpenAI-style clients do every turn) finds it there.

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Positions in one KV block.
pub const BLOCK_POSITIONS: usize = 16;

/// A block's identity in the prefix cache: the tokens it holds and the
/// hash of every token before them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct BlockKey {
    parent: u64,
    tokens: Vec<u32>,
}

impl BlockKey {
    fn hash(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        Hash::hash(self, &mut h);
        h.finish()
    }
}

/// How much of the budget is in use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KvUsage {
    pub block_positions: usize,
    pub block_bytes: usize,
    pub blocks_total: usize,
    /// Blocks held by live sequences.
    pub blocks_used: usize,
    /// Blocks no sequence holds that keep a computed prefix for reuse.
    pub blocks_cached: usize,
}

impl KvUsage {
    pub fn bytes_total(&self) -> usize {
        self.blocks_total * self.block_bytes
    }
    pub fn bytes_used(&self) -> usize {
        self.blocks_used * self.block_bytes
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the KV cache is full: {need} more blocks of {block_positions} positions needed, {free} of {total} free ({bytes} bytes each); raise --kv-budget or run fewer sequences at once")]
pub struct KvFull {
    pub need: usize,
    pub free: usize,
    pub total: usize,
    pub block_positions: usize,
    pub bytes: usize,
}

#[derive(Default)]
struct State {
    refs: Vec<u32>,
    /// Free blocks that hold nothing worth keeping, lowest first (so that
    /// the memory in use stays at the front of the pages).
    free: BinaryHeap<std::cmp::Reverse<u32>>,
    /// Free blocks that hold a registered prefix, by the time they were
    /// freed: the oldest is reused first.
    cached: BTreeMap<u64, u32>,
    freed_at: Vec<u64>,
    clock: u64,
    key_of: Vec<Option<(u64, BlockKey)>>,
    by_hash: HashMap<u64, u32>,
}

impl State {
    fn available(&self) -> usize {
        self.free.len() + self.cached.len()
    }

    fn take(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(std::cmp::Reverse(b)) => b,
            None => {
                let (&t, &b) = self.cached.iter().next()?;
                self.cached.remove(&t);
                self.forget(b);
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Takes the block out of the prefix cache's index.
    fn forget(&mut self, b: u32) {
        if let Some((h, _)) = self.key_of[b as usize].take() {
            if self.by_hash.get(&h) == Some(&b) {
                self.by_hash.remove(&h);
            }
        }
    }

    fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released more often than held");
        *r = r.saturating_sub(1);
        if *r == 0 {
            if self.key_of[b as usize].is_some() {
                self.clock += 1;
                self.freed_at[b as usize] = self.clock;
                self.cached.insert(self.clock, b);
            } else {
                self.free.push(std::cmp::Reverse(b));
            }
        }
    }

    /// One more holder of `b`, which may be a cached (free) block.
    fn retain(&mut self, b: u32) {
        if self.refs[b as usize] == 0 {
            self.cached.remove(&self.freed_at[b as usize]);
        }
        self.refs[b as usize] += 1;
    }
}

/// The block allocator: shared by the engine and every sequence (which
/// gives its blocks back when dropped).
pub struct KvBlocks {
    state: Mutex<State>,
    freed: Condvar,
    block_bytes: usize,
    total: usize,
}

impl KvBlocks {
    pub fn new(total: usize, block_bytes: usize) -> KvBlocks {
        let state = State {
            refs: vec![0; total],
            free: (0..total as u32).map(std::cmp::Reverse).collect(),
            freed_at: vec![0; total],
            key_of: vec![None; total],
            ..Default::default()
        };
        KvBlocks { state: Mutex::new(state), freed: Condvar::new(), block_bytes, total }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn usage(&self) -> KvUsage {
        let s = self.lock();
        KvUsage {
            block_positions: BLOCK_POSITIONS,
            block_bytes: self.block_bytes,
            blocks_total: self.total,
            blocks_used: s.refs.iter().filter(|&&r| r > 0).count(),
            blocks_cached: s.cached.len(),
        }
    }

    /// `n` blocks, or an error that says how full the cache is; with
    /// `wait`, waits for other sequences to give blocks back (when `n`
    /// could ever fit).
    pub fn allocate(&self, n: usize, wait: bool) -> Result<Vec<u32>, KvFull> {
        let mut s = self.lock();
        while s.available() < n {
            if !wait || n > self.total {
                return Err(KvFull { need: n, free: s.available(), total: self.total, block_positions: BLOCK_POSITIONS, bytes: self.block_bytes });
            }
            s = self.freed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        Ok((0..n).map(|_| s.take().expect("counted above")).collect())
    }

    /// Gives blocks back.
    pub fn release(&self, blocks: &[u32]) {
        if blocks.is_empty() {
            return;
        }
        let mut s = self.lock();
        blocks.iter().for_each(|&b| s.release(b));
        drop(s);
        self.freed.notify_all();
    }

    /// Whether `b` is held by anyone else or registered as a prefix: then
    /// a sequence must not write into it.
    pub fn is_shared(&self, b: u32) -> bool {
        let s = self.lock();
        s.refs[b as usize] > 1 || s.key_of[b as usize].is_some()
    }

    /// How many sequences hold `b`.
    pub fn holders(&self, b: u32) -> u32 {
        self.lock().refs[b as usize]
    }

    /// The blocks holding the longest run of whole blocks of `tokens` that
    /// the cache has, each retained for the caller.
    pub fn lookup(&self, tokens: &[u32]) -> Vec<u32> {
        let mut s = self.lock();
        let mut parent = 0u64;
        let mut found = Vec::new();
        for chunk in tokens.chunks_exact(BLOCK_POSITIONS) {
            let key = BlockKey { parent, tokens: chunk.to_vec() };
            let h = key.hash();
            match s.by_hash.get(&h).copied() {
                Some(b) if s.key_of[b as usize].as_ref().is_some_and(|(_, k)| *k == key) => {
                    s.retain(b);
                    found.push(b);
                    parent = h;
                }
                _ => break,
            }
        }
        found
    }

    /// Registers the full blocks `table[from..]` of a sequence whose first
    /// tokens are `tokens` (every block of `table[..from]` registered
    /// already). Returns the number of blocks registered in all.
    pub fn register(&self, table: &[u32], tokens: &[u32], from: usize) -> usize {
        let full = (tokens.len() / BLOCK_POSITIONS).min(table.len());
        if full <= from {
            return from;
        }
        let mut s = self.lock();
        let mut parent = 0u64;
        for (i, chunk) in tokens.chunks_exact(BLOCK_POSITIONS).take(full).enumerate() {
            let key = BlockKey { parent, tokens: chunk.to_vec() };
            let h = key.hash();
            let b = table[i];
            if i >= from && s.key_of[b as usize].is_none() && !s.by_hash.contains_key(&h) {
                s.by_hash.insert(h, b);
                s.key_of[b as usize] = Some((h, key));
            }
            parent = h;
        }
        full
    }

    /// Takes a block out of the prefix index before its holder (the only
    /// one) writes into it again.
    pub fn unregister(&self, b: u32) {
        self.lock().forget(b);
    }

    /// Drops every cached prefix that no sequence holds.
    pub fn clear_cache(&self) {
        let mut s = self.lock();
        while let Some((&t, &b)) = s.cached.iter().next() {
            s.cached.remove(&t);
            s.forget(b);
            s.free.push(std::cmp::Reverse(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn blocks_come_back_and_the_budget_holds() {
        let kv = KvBlocks::new(4, 100);
        let a = kv.allocate(3, false).unwrap();
        assert_eq!(a, vec![0, 1, 2], "lowest first");
        let e = kv.allocate(2, false).unwrap_err();
        assert_eq!((e.need, e.free, e.total), (2, 1, 4));
        assert!(e.to_string().contains("KV cache is full"));
        assert_eq!(kv.usage().blocks_used, 3);
        kv.release(&a);
        assert_eq!(kv.usage().blocks_used, 0);
        assert_eq!(kv.allocate(4, false).unwrap().len(), 4);
        assert!(kv.allocate(5, true).is_err(), "never fits: no waiting");
    }

    #[test]
    fn a_registered_prefix_is_found_shared_and_kept_after_release() {
        let kv = KvBlocks::new(8, 1);
        let t = toks(3 * BLOCK_POSITIONS + 5, 1);
        let table = kv.allocate(4, false).unwrap();
        assert_eq!(kv.register(&table, &t, 0), 3);
        // The same first two blocks, then different tokens.
        let mut u = t[..2 * BLOCK_POSITIONS].to_vec();
        u.extend(toks(BLOCK_POSITIONS, 99));
        let found = kv.lookup(&u);
        assert_eq!(found, table[..2].to_vec());
        assert!(kv.is_shared(found[0]));
        // A different first token matches nothing.
        assert!(kv.lookup(&toks(40, 2)).is_empty());
        kv.release(&found);
        kv.release(&table);
        let use_ = kv.usage();
        assert_eq!((use_.blocks_used, use_.blocks_cached), (0, 3));
        // Still there after every holder left.
        let again = kv.lookup(&t);
        assert_eq!(again, table[..3].to_vec());
        kv.release(&again);
        // Space is taken from plain free blocks first, then the oldest cached.
        let all = kv.allocate(8, false).unwrap();
        assert_eq!(all.len(), 8);
        kv.release(&all);
        assert!(kv.lookup(&t).is_empty(), "reused blocks leave the index");
    }

    #[test]
    fn clearing_the_cache_frees_its_blocks() {
        let kv = KvBlocks::new(2, 1);
        let t = toks(BLOCK_POSITIONS, 3);
        let b = kv.allocate(1, false).unwrap();
        kv.register(&b, &t, 0);
        kv.release(&b);
        assert_eq!(kv.usage().blocks_cached, 1);
        kv.clear_cache();
        assert_eq!(kv.usage().blocks_cached, 0);
        assert!(kv.lookup(&t).is_empty());
    }

    #[test]
    fn a_waiting_allocation_gets_the_blocks_given_back() {
        let kv = std::sync::Arc::new(KvBlocks::new(2, 1));
        let held = kv.allocate(2, false).unwrap();
        let k2 = kv.clone();
        let waiter = std::thread::spawn(move || k2.allocate(1, true).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(30));
        kv.release(&held[..1]);
        assert_eq!(waiter.join().unwrap(), vec![held[0]]);
    }
}
