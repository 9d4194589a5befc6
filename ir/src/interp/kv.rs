//! Where attention keeps keys and values: the [`KvStore`] interface that
//! the attention op (interpreted or compiled) writes and reads, the view of
//! one KV head's positions it reads through ([`KvHead`]), and [`KvCache`],
//! a store for one sequence in one contiguous stretch per head.
//!
//! The runtime's paged cache for many sequences implements the same
//! interface: each row of an evaluation belongs to a sequence, and a
//! sequence's positions live in fixed-size blocks named by its block
//! table. A position's key is found as `table[p / block]`, then `p % block`
//! within that block; the contiguous cache is the case of one block.

use super::{eval_err, EvalError};
use half::f16;
use half::vec::HalfBitsVecExt;

/// How a KV cache holds its numbers: as computed (`F32`), or rounded to
/// the nearest f16 when stored (`F16`: half the bytes to keep and to read
/// each step, as llama.cpp's default cache; lossy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvType {
    #[default]
    F32,
    F16,
}

impl KvType {
    pub const ALL: [KvType; 2] = [KvType::F32, KvType::F16];

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
        }
    }

    pub fn from_name(s: &str) -> Option<KvType> {
        s.parse().ok()
    }

    /// Bytes a number takes.
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }
}

/// A type by its name, or an error that lists the names.
impl std::str::FromStr for KvType {
    type Err = String;

    fn from_str(s: &str) -> Result<KvType, String> {
        crate::names::parse_name("KV cache type", s, &KvType::ALL, KvType::name)
    }
}

/// A number as a KV cache keeps it.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// The numbers as f32s, where they are.
    fn as_f32s(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
}

impl KvElem for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn as_f32s(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn from_f32(x: f32) -> f16 {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Keys and values per layer for the rows of one evaluation.
pub trait KvStore: Sync {
    /// Writes the keys and values of every row of this evaluation (row `i`
    /// at `positions[i]` of its own sequence) into layer `layer`; `k` and
    /// `v` hold `heads` heads of `head_dim` a row. A position may overwrite
    /// a held one or follow the last, never skip ahead.
    fn store(&mut self, layer: usize, heads: usize, head_dim: usize, positions: &[i32], k: &[f32], v: &[f32]) -> Result<(), EvalError>;

    /// The keys and values of KV head `head` of layer `layer` that row
    /// `row` reads: its sequence's positions, `held` of them.
    fn head(&self, layer: usize, row: usize, head: usize) -> KvView<'_>;

    /// Row `row`'s block table where the store is paged: its sequence's
    /// blocks in position order, for a backend that keeps the blocks'
    /// contents itself (a GPU's copy of the pages).
    fn table(&self, _row: usize) -> Option<&[u32]> {
        None
    }
}

/// One KV head's keys and values as the cache holds them.
#[derive(Clone, Copy, Debug)]
pub enum KvView<'a> {
    F32(KvHead<'a, f32>),
    F16(KvHead<'a, f16>),
}

impl KvView<'_> {
    /// Positions held.
    pub fn held(&self) -> usize {
        match self {
            KvView::F32(h) => h.held,
            KvView::F16(h) => h.held,
        }
    }

    pub fn head_dim(&self) -> usize {
        match self {
            KvView::F32(h) => h.d,
            KvView::F16(h) => h.d,
        }
    }
}

/// One KV head's keys and values for one sequence, position by position
/// (`d` values each), in blocks of `1 << shift` positions.
#[derive(Clone, Copy, Debug)]
pub struct KvHead<'a, E = f32> {
    keys: &'a [E],
    values: &'a [E],
    /// Where this head starts within a block.
    base: usize,
    /// The sequence's blocks, in position order.
    table: &'a [u32],
    shift: u32,
    /// Floats from one block to the next.
    stride: usize,
    d: usize,
    /// Positions held.
    pub held: usize,
}

const ONE_BLOCK: &[u32] = &[0];

impl<'a, E> KvHead<'a, E> {
    /// A view of paged storage: `table` names the blocks, each of
    /// `1 << shift` positions and `stride` numbers, this head `base`
    /// numbers into each.
    #[allow(clippy::too_many_arguments)]
    pub fn paged(keys: &'a [E], values: &'a [E], base: usize, table: &'a [u32], shift: u32, stride: usize, d: usize, held: usize) -> Self {
        KvHead { keys, values, base, table, shift, stride, d, held }
    }

    /// A view of `keys` and `values` held in one stretch.
    pub fn contiguous(keys: &'a [E], values: &'a [E], d: usize) -> Self {
        let held = keys.len() / d.max(1);
        KvHead { keys, values, base: 0, table: ONE_BLOCK, shift: usize::BITS - 1, stride: 0, d, held }
    }

    pub fn empty() -> Self {
        Self::contiguous(&[], &[], 1)
    }

    pub fn head_dim(&self) -> usize {
        self.d
    }

    #[inline(always)]
    fn at(&self, t: usize) -> usize {
        let mask = (1usize << self.shift) - 1;
        self.base + self.table[t >> self.shift] as usize * self.stride + (t & mask) * self.d
    }

    /// The key at position `t`.
    #[inline(always)]
    pub fn key(&self, t: usize) -> &'a [E] {
        &self.keys[self.at(t)..][..self.d]
    }

    /// The value at position `t`.
    #[inline(always)]
    pub fn value(&self, t: usize) -> &'a [E] {
        &self.values[self.at(t)..][..self.d]
    }

    /// The first `n` keys and values as two slices, when they are stored in
    /// one stretch (one block).
    pub fn contiguous_prefix(&self, n: usize) -> Option<(&'a [E], &'a [E])> {
        if n == 0 {
            return Some((&[], &[]));
        }
        ((n - 1) >> self.shift == 0).then(|| {
            let at = self.at(0);
            (&self.keys[at..][..n * self.d], &self.values[at..][..n * self.d])
        })
    }
}

/// Keys and values of every layer at every evaluated position of one
/// sequence.
///
/// Each KV head's keys (and values) are kept together, position after
/// position (`[head][position][head_dim]`), so that attention reads them
/// as one sequential stretch; room for more positions is made by doubling
/// (or, with [`KvCache::with_capacity`], reserved at the start: address
/// space only, until written).
#[derive(Default, Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Positions each layer makes room for when first written.
    reserve: usize,
}

#[derive(Default, Debug)]
struct LayerCache {
    heads: usize,
    head_dim: usize,
    /// Positions there is room for, and positions held.
    cap: usize,
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl LayerCache {
    /// Room for `cap` positions, keeping those held.
    fn grow(&mut self, cap: usize) {
        let (d, len) = (self.head_dim, self.len);
        for data in [&mut self.k, &mut self.v] {
            let mut more = vec![0f32; self.heads * cap * d];
            for h in 0..self.heads {
                more[h * cap * d..][..len * d].copy_from_slice(&data[h * self.cap * d..][..len * d]);
            }
            *data = more;
        }
        self.cap = cap;
    }
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
    /// A cache whose layers make room for `positions` when first written,
    /// so that growing never copies them.
    pub fn with_capacity(positions: usize) -> Self {
        KvCache { layers: Vec::new(), reserve: positions }
    }
    /// Positions held (those of layer 0).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Forgets every position, keeping the memory for the next ones.
    pub fn clear(&mut self) {
        self.truncate(0);
    }
    /// Keeps positions `0..len`.
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            l.len = l.len.min(len);
        }
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| 2 * l.heads * l.len * l.head_dim * 4).sum()
    }
}

impl KvStore for KvCache {
    fn store(&mut self, layer: usize, heads: usize, head_dim: usize, positions: &[i32], k: &[f32], v: &[f32]) -> Result<(), EvalError> {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, LayerCache::default);
        }
        let reserve = self.reserve;
        let cache = &mut self.layers[layer];
        if cache.heads == 0 {
            (cache.heads, cache.head_dim) = (heads, head_dim);
        }
        if (cache.heads, cache.head_dim) != (heads, head_dim) {
            return eval_err(format!("layer {layer} caches {} heads of {}, got {heads} of {head_dim}", cache.heads, cache.head_dim));
        }
        let row = heads * head_dim;
        for ((kr, vr), &p) in k.chunks_exact(row).zip(v.chunks_exact(row)).zip(positions) {
            if p < 0 || p as usize > cache.len {
                return eval_err(format!("position {p} skips past the {} cached positions", cache.len));
            }
            let p = p as usize;
            if p == cache.cap {
                cache.grow((2 * cache.cap).max(reserve).max(16));
            }
            let (cap, d) = (cache.cap, head_dim);
            for h in 0..heads {
                cache.k[(h * cap + p) * d..][..d].copy_from_slice(&kr[h * d..][..d]);
                cache.v[(h * cap + p) * d..][..d].copy_from_slice(&vr[h * d..][..d]);
            }
            cache.len = cache.len.max(p + 1);
        }
        Ok(())
    }

    fn head(&self, layer: usize, _row: usize, head: usize) -> KvView<'_> {
        match self.layers.get(layer) {
            Some(l) if head < l.heads => {
                let at = head * l.cap * l.head_dim;
                KvView::F32(KvHead::contiguous(&l.k[at..][..l.len * l.head_dim], &l.v[at..][..l.len * l.head_dim], l.head_dim))
            }
            _ => KvView::F32(KvHead::empty()),
        }
    }
}

/// Paged storage for many sequences: per layer, `blocks` blocks of
/// `1 << shift` positions, laid out `[kv_heads][blocks][positions][head_dim]`
/// (keys, and values alike): a KV head's blocks lie side by side, so a
/// sequence whose blocks have consecutive numbers (as a fresh cache hands
/// them out) has each head's keys in one stretch, which attention reads
/// at the memory's speed (blocks of a head apart, 8 KiB runs 40 KiB apart
/// on 2B4T, read it 40-50% slower). Allocated zeroed, so pages are only
/// mapped once written. The numbers are f32 or f16 ([`KvType`]).
/// Which sequence owns which block is the runtime's business; an
/// evaluation reads and writes through [`PagedRows`].
#[derive(Debug)]
pub struct KvPages {
    data: PageData,
    shape: PageShape,
}

/// Each layer's keys and values.
#[derive(Debug)]
enum PageData {
    F32(Vec<[Vec<f32>; 2]>),
    F16(Vec<[Vec<f16>; 2]>),
}

#[derive(Clone, Copy, Debug)]
struct PageShape {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    shift: u32,
    blocks: usize,
}

impl PageShape {
    /// Numbers from one block of a head to the next.
    fn stride(&self) -> usize {
        self.head_dim << self.shift
    }

    /// Where head `h`'s blocks start.
    fn head_base(&self, h: usize) -> usize {
        h * self.blocks * self.stride()
    }

    /// Copies positions `0..n` of block `from` into block `to`.
    fn copy_block<E: Copy>(&self, data: &mut [E], from: u32, to: u32, n: usize) {
        for h in 0..self.kv_heads {
            let at = |b: u32| self.head_base(h) + b as usize * self.stride();
            data.copy_within(at(from)..at(from) + n * self.head_dim, at(to));
        }
    }

    /// Writes each row's keys and values at its position (see
    /// [`KvStore::store`]), rounded to `E`.
    fn store<E: KvElem>(
        &self,
        [keys, values]: &mut [Vec<E>; 2],
        tables: &[&[u32]],
        held: &[usize],
        positions: &[i32],
        k: &[f32],
        v: &[f32],
    ) -> Result<(), EvalError> {
        let (d, shift) = (self.head_dim, self.shift);
        let row = self.kv_heads * d;
        for (i, ((kr, vr), &pos)) in k.chunks_exact(row).zip(v.chunks_exact(row)).zip(positions).enumerate() {
            let table = tables[i];
            let Some(&block) = usize::try_from(pos).ok().and_then(|pos| table.get(pos >> shift)) else {
                return eval_err(format!("position {pos} has no KV block ({} blocks of {} positions)", table.len(), 1 << shift));
            };
            if block as usize >= self.blocks || pos as usize >= held[i] {
                return eval_err(format!("position {pos}: block {block} of {}, {} positions held", self.blocks, held[i]));
            }
            let at = block as usize * self.stride() + (pos as usize & ((1 << shift) - 1)) * d;
            for h in 0..self.kv_heads {
                let o = at + self.head_base(h);
                for (dst, src) in [(&mut keys[o..][..d], &kr[h * d..][..d]), (&mut values[o..][..d], &vr[h * d..][..d])] {
                    for (x, &y) in dst.iter_mut().zip(src) {
                        *x = E::from_f32(y);
                    }
                }
            }
        }
        Ok(())
    }

    fn head<'a, E>(&self, [k, v]: &'a [Vec<E>; 2], table: &'a [u32], held: usize, head: usize) -> KvHead<'a, E> {
        let held = held.min(table.len() << self.shift);
        KvHead::paged(k, v, self.head_base(head), table, self.shift, self.stride(), self.head_dim, held)
    }
}

impl KvPages {
    /// `positions` a block (a power of two), each number a `ty`.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, positions: usize, blocks: usize, ty: KvType) -> KvPages {
        assert!(positions.is_power_of_two(), "a KV block holds a power of two positions");
        let n = blocks * kv_heads * positions * head_dim;
        let data = match ty {
            KvType::F32 => PageData::F32((0..layers).map(|_| [vec![0f32; n], vec![0f32; n]]).collect()),
            // Zeroed as u16, so that the allocation is as lazy as f32's.
            KvType::F16 => PageData::F16((0..layers).map(|_| [vec![0u16; n].reinterpret_into(), vec![0u16; n].reinterpret_into()]).collect()),
        };
        KvPages { data, shape: PageShape { layers, kv_heads, head_dim, shift: positions.trailing_zeros(), blocks } }
    }

    pub fn kv_type(&self) -> KvType {
        match self.data {
            PageData::F32(_) => KvType::F32,
            PageData::F16(_) => KvType::F16,
        }
    }

    /// Positions a block holds.
    pub fn block_positions(&self) -> usize {
        1 << self.shape.shift
    }

    pub fn blocks(&self) -> usize {
        self.shape.blocks
    }

    /// Bytes of one block over every layer, keys and values.
    pub fn block_bytes(&self) -> usize {
        let s = &self.shape;
        Self::bytes_per_block(s.layers, s.kv_heads, s.head_dim, self.block_positions(), self.kv_type())
    }

    pub fn bytes_per_block(layers: usize, kv_heads: usize, head_dim: usize, positions: usize, ty: KvType) -> usize {
        2 * layers * kv_heads * positions * head_dim * ty.bytes()
    }

    /// Copies positions `0..n` of block `from` into block `to`, in every
    /// layer (a block that becomes private before it is written).
    pub fn copy_block(&mut self, from: u32, to: u32, n: usize) {
        let s = self.shape;
        match &mut self.data {
            PageData::F32(layers) => layers.iter_mut().flatten().for_each(|data| s.copy_block(data, from, to, n)),
            PageData::F16(layers) => layers.iter_mut().flatten().for_each(|data| s.copy_block(data, from, to, n)),
        }
    }

    /// The store for one evaluation: row `i` belongs to the sequence whose
    /// block table is `tables[i]` and that holds `held[i]` positions once
    /// this evaluation has stored its rows.
    pub fn rows<'a>(&'a mut self, tables: &'a [&'a [u32]], held: &'a [usize]) -> PagedRows<'a> {
        PagedRows { pages: self, tables, held }
    }
}

/// [`KvPages`] seen by the rows of one evaluation.
pub struct PagedRows<'a> {
    pages: &'a mut KvPages,
    tables: &'a [&'a [u32]],
    held: &'a [usize],
}

impl KvStore for PagedRows<'_> {
    fn store(&mut self, layer: usize, heads: usize, head_dim: usize, positions: &[i32], k: &[f32], v: &[f32]) -> Result<(), EvalError> {
        let s = self.pages.shape;
        if (heads, head_dim) != (s.kv_heads, s.head_dim) || layer >= s.layers {
            return eval_err(format!(
                "the KV cache holds {} layers of {} heads of {}, got layer {layer} with {heads} of {head_dim}",
                s.layers, s.kv_heads, s.head_dim
            ));
        }
        if positions.len() != self.tables.len() {
            return eval_err(format!("{} rows for a KV store of {}", positions.len(), self.tables.len()));
        }
        match &mut self.pages.data {
            PageData::F32(layers) => s.store(&mut layers[layer], self.tables, self.held, positions, k, v),
            PageData::F16(layers) => s.store(&mut layers[layer], self.tables, self.held, positions, k, v),
        }
    }

    fn head(&self, layer: usize, row: usize, head: usize) -> KvView<'_> {
        let s = &self.pages.shape;
        match (self.tables.get(row), layer < s.layers && head < s.kv_heads) {
            (Some(table), true) => match &self.pages.data {
                PageData::F32(layers) => KvView::F32(s.head(&layers[layer], table, self.held[row], head)),
                PageData::F16(layers) => KvView::F16(s.head(&layers[layer], table, self.held[row], head)),
            },
            _ => KvView::F32(KvHead::empty()),
        }
    }

    fn table(&self, row: usize) -> Option<&[u32]> {
        self.tables.get(row).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A paged view finds each position in its block, whatever order the
    /// blocks are in; one block in one stretch is a contiguous prefix.
    #[test]
    fn paged_views_find_positions_through_the_table() {
        let (d, heads, shift) = (3usize, 2usize, 2u32);
        let block = 1usize << shift;
        let stride = heads * block * d;
        let blocks = 5;
        // keys[b][h][t][j] = 1000 b + 100 h + 10 t + j
        let keys: Vec<f32> =
            (0..blocks * stride).map(|i| (i / stride * 1000 + i % stride / (block * d) * 100 + i % (block * d) / d * 10 + i % d) as f32).collect();
        let table = [3u32, 0, 4];
        let h = KvHead::paged(&keys, &keys, block * d, &table, shift, stride, d, 10);
        for t in 0..10 {
            let b = table[t / block] as usize;
            let want: Vec<f32> = (0..d).map(|j| (b * 1000 + 100 + t % block * 10 + j) as f32).collect();
            assert_eq!(h.key(t), want, "position {t}");
        }
        assert!(h.contiguous_prefix(5).is_none());
        assert_eq!(h.contiguous_prefix(4).unwrap().0.len(), 4 * d);
        let c = KvHead::contiguous(&keys[..9], &keys[..9], 3);
        assert_eq!((c.held, c.key(2)), (3, &keys[6..9]));
        assert!(c.contiguous_prefix(3).is_some());
    }

    /// The numbers row `i`'s KV head `h` holds at position `p`, widened.
    fn read(rows: &PagedRows, layer: usize, i: usize, h: usize, p: usize) -> (Vec<f32>, Vec<f32>) {
        fn widen<E: KvElem>(h: KvHead<E>, p: usize) -> (Vec<f32>, Vec<f32>) {
            (h.key(p).iter().map(|x| x.to_f32()).collect(), h.value(p).iter().map(|x| x.to_f32()).collect())
        }
        match rows.head(layer, i, h) {
            KvView::F32(h) => widen(h, p),
            KvView::F16(h) => widen(h, p),
        }
    }

    /// Two sequences' rows side by side in one store, their blocks
    /// interleaved: each reads back its own keys (rounded to the nearest
    /// f16 in an f16 store, exact in an f32 one), and a copied block holds
    /// the copied positions.
    #[test]
    fn paged_rows_keep_sequences_apart() {
        let (heads, d) = (2, 3);
        for ty in KvType::ALL {
            let round = |x: &[f32]| -> Vec<f32> { x.iter().map(|&x| if ty == KvType::F16 { f16::from_f32(x).to_f32() } else { x }).collect() };
            let mut pages = KvPages::new(2, heads, d, 2, 6, ty);
            assert_eq!((pages.kv_type(), pages.block_bytes()), (ty, 2 * 2 * heads * 2 * d * ty.bytes()));
            let (a, b): (&[u32], &[u32]) = (&[4, 1], &[0, 5]);
            let tables = [a, a, a, b, b];
            let held = [3, 3, 3, 2, 2];
            let positions = [0, 1, 2, 0, 1];
            // Thirds are not f16 numbers: an f16 store rounds them.
            let k: Vec<f32> = (0..5 * heads * d).map(|i| i as f32 / 3.0).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            let mut rows = pages.rows(&tables, &held);
            rows.store(1, heads, d, &positions, &k, &v).unwrap();
            for (i, &p) in positions.iter().enumerate() {
                for h in 0..heads {
                    let at = (i * heads + h) * d..(i * heads + h + 1) * d;
                    assert_eq!(read(&rows, 1, i, h, p as usize), (round(&k[at.clone()]), round(&v[at])), "{ty:?}");
                }
            }
            assert_eq!(read(&rows, 1, 2, 1, 2).0 == k[(2 * heads + 1) * d..][..d], ty == KvType::F32, "{ty:?}: an f16 store rounds a third");
            assert!(rows.store(1, heads, d, &[0, 1, 3, 0, 1], &k, &v).is_err(), "position past held");
            pages.copy_block(4, 2, 2);
            let c: &[u32] = &[2];
            let tables = [c];
            let rows = pages.rows(&tables, &[2]);
            assert_eq!(read(&rows, 1, 0, 1, 1).0, round(&k[(heads + 1) * d..][..d]), "{ty:?}");
        }
    }
}
