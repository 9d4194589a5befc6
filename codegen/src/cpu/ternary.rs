//! Ternary matrix products over int8 activations: the packed weight
//! layouts, a scalar reference kernel, and native AVX2 micro-kernels.
//!
//! Layout. Each weight is stored as its code `value + 1` (0, 1 or 2), in
//! one of two [`Packing`]s. With 2 bits a code, a row of `k` weights is
//! padded with zeros to `kp`, a multiple of 128, and cut into chunks of
//! 128 weights in 32 bytes: byte `j` of a chunk holds weights `j`, `j + 32`,
//! `j + 64`, `j + 96` in bits 7:6, 5:4, 3:2 and 1:0 (bitnet.cpp's I2_S
//! order, so one shift and one mask give 32 consecutive codes). With 1.6
//! bits ([`super::base3`]) a chunk is 160 weights in 32 bytes, five codes a
//! byte. Rows go in tiles of `rows`: for each chunk, the tile's rows follow
//! each other, so a multi-row kernel reads one stream.
//!
//! Arithmetic. With codes `c = w + 1`, `Σ w·x = Σ c·x − Σ x`: the kernels
//! multiply unsigned codes by signed activations (`pmaddubsw`) and subtract
//! each token's `Σ x` once. The result, `((dot as f32) · β) / γ`, then the
//! epilogue, is the interpreter's arithmetic for one scale per tensor.

#[cfg(target_arch = "x86_64")]
use super::amx;
use super::base3;
use super::blob::Blob;
pub use super::epilogue::Epilogue;
use super::epilogue::{finish_blocks, finish_glu_blocks, finish_rows, Block, GluUnit};
use super::lines::LineVec;
use super::pool::{share, Chunks, Pool, SharedMut};
use super::{vmath, Isa};
use bitnet_ir::interp::WeightView;
use bitnet_ir::DType;
use bitnet_ir::GateAct;

/// Weights per chunk of the 2-bit packing, and the bytes of a chunk of either.
pub const CHUNK: usize = 128;
pub(crate) const CHUNK_BYTES: usize = 32;

/// How a matrix's codes are packed: fixed when it is loaded, as its rows
/// per tile are, and chosen with them (a [`TernaryTiles`] knob).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Packing {
    /// Four codes a byte, 128 weights a chunk (I2_S's order).
    #[default]
    Bits2,
    /// Five codes a byte as one base-3 number (TQ1_0's encoding), 160
    /// weights a chunk: 20% fewer bytes to read, more work to unpack.
    Base3,
}

/// A packing by its name, or an error that lists the names.
impl std::str::FromStr for Packing {
    type Err = String;

    fn from_str(s: &str) -> Result<Packing, String> {
        bitnet_ir::names::parse_name("packing", s, &Packing::ALL, Packing::name)
    }
}

impl Packing {
    pub const ALL: [Packing; 2] = [Packing::Bits2, Packing::Base3];

    pub fn name(self) -> &'static str {
        match self {
            Packing::Bits2 => "2bit",
            Packing::Base3 => "1.6bit",
        }
    }

    pub fn from_name(s: &str) -> Option<Packing> {
        s.parse().ok()
    }

    /// Weights in one 32-byte chunk.
    pub fn chunk(self) -> usize {
        match self {
            Packing::Bits2 => CHUNK,
            Packing::Base3 => base3::CHUNK,
        }
    }

    /// Codes a byte holds: the 32-code groups of a chunk.
    fn groups(self) -> usize {
        self.chunk() / CHUNK_BYTES
    }

    /// `k` rounded up to whole chunks.
    pub fn padded(self, k: usize) -> usize {
        k.div_ceil(self.chunk()) * self.chunk()
    }
}

/// The padded length of a row of `k` activations: enough for a matrix
/// of either packing.
pub fn padded_acts(k: usize) -> usize {
    Packing::ALL.into_iter().map(|p| p.padded(k)).max().expect("two packings")
}

/// Tile parameters of the ternary kernels. Rows per step fix the weight
/// layout; tokens per step and the split only how prefill walks the
/// activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TernaryTiles {
    pub isa: Isa,
    /// Output rows computed together (1, 2 or 4).
    pub rows: usize,
    /// Tokens computed together in prefill (1, 2 or 4).
    pub tokens: usize,
    #[serde(default)]
    pub split: Split,
    /// Fixes the weight layout, like `rows`.
    #[serde(default)]
    pub packing: Packing,
}

/// How the workers share a matrix product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Each worker computes some row tiles for every token (row-parallel):
    /// the weights are read once in all.
    #[default]
    Rows,
    /// Each worker computes every row for some tokens (activation-parallel):
    /// each worker reads all the weights, from a cache it does not share.
    /// Used only when there are at least as many tokens as workers.
    Tokens,
}

impl Split {
    pub const ALL: [Split; 2] = [Split::Rows, Split::Tokens];

    pub fn name(self) -> &'static str {
        match self {
            Split::Rows => "rows",
            Split::Tokens => "tokens",
        }
    }
}

impl TernaryTiles {
    pub const ROWS: [usize; 3] = [1, 2, 4];
    pub const TOKENS: [usize; 3] = [1, 2, 4];

    /// `rows` and `tokens` per step on `isa`, split by rows, 2-bit packing.
    pub fn new(isa: Isa, rows: usize, tokens: usize) -> TernaryTiles {
        TernaryTiles { isa, rows, tokens, split: Split::Rows, packing: Packing::Bits2 }
    }

    /// Whether this CPU has kernels for these tiles: every ISA reads the
    /// 2-bit packing; the 1.6-bit one has the reference, AVX2 and AVX-512
    /// VNNI kernels (none generated by Cranelift).
    pub fn is_valid(&self) -> bool {
        let packing = self.packing == Packing::Bits2 || matches!(self.isa, Isa::Scalar | Isa::Avx2 | Isa::Avx512Vnni);
        Self::ROWS.contains(&self.rows) && Self::TOKENS.contains(&self.tokens) && self.isa.available() && packing
    }
}

impl std::fmt::Display for TernaryTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "isa={} rows={} tokens={} split={}", self.isa.name(), self.rows, self.tokens, self.split.name())?;
        match self.packing {
            Packing::Bits2 => Ok(()),
            p => write!(f, " packing={}", p.name()),
        }
    }
}

/// A ternary weight matrix `[n, k]` in the kernels' layout.
pub struct PackedTernary {
    pub n: usize,
    pub k: usize,
    /// `k` rounded up to a whole chunk.
    pub kp: usize,
    /// Rows per tile.
    pub rows: usize,
    pub packing: Packing,
    /// β: the one weight scale.
    pub scale: f32,
    data: Blob<u8>,
}

impl PackedTernary {
    /// Packs rows given as values −1, 0, 1, `codes(r, out)` filling row `r`,
    /// two bits a code.
    pub fn from_rows(n: usize, k: usize, rows: usize, scale: f32, codes: impl FnMut(usize, &mut [i8])) -> PackedTernary {
        PackedTernary::pack(n, k, rows, Packing::Bits2, scale, codes)
    }

    /// [`PackedTernary::from_rows`] in any packing.
    pub fn pack(n: usize, k: usize, rows: usize, packing: Packing, scale: f32, mut codes: impl FnMut(usize, &mut [i8])) -> PackedTernary {
        // Past `k` the values stay 0: the padding's code 1.
        let mut values = vec![0i8; packing.padded(k)];
        PackedTernary::from_chunks(n, k, rows, packing, scale, |r, out| {
            values[..k].fill(0);
            codes(r, &mut values[..k]);
            for (chunk, vals) in out.chunks_exact_mut(CHUNK_BYTES).zip(values.chunks_exact(packing.chunk())) {
                let chunk: &mut [u8; CHUNK_BYTES] = chunk.try_into().expect("one chunk");
                pack_chunk(packing, vals, chunk);
            }
        })
    }

    /// The same matrix in another packing (itself if it is in that one).
    pub fn with_packing(self, packing: Packing) -> PackedTernary {
        if self.packing == packing {
            return self;
        }
        PackedTernary::pack(self.n, self.k, self.rows, packing, self.scale, |r, out| self.values(r, out))
    }

    /// Row `r`'s values −1, 0, 1, decoded by the reference rule of its packing.
    pub fn values(&self, r: usize, out: &mut [i8]) {
        let (tile, in_tile) = (self.tile(r / self.rows), r % self.rows);
        let len = self.packing.chunk();
        let mut chunk_values = [0i8; base3::CHUNK];
        for (c, chunk) in tile.chunks_exact(self.rows * CHUNK_BYTES).enumerate() {
            let Some(dst) = out.get_mut(c * len..) else { break };
            let bytes: &[u8; CHUNK_BYTES] = chunk[in_tile * CHUNK_BYTES..][..CHUNK_BYTES].try_into().expect("one chunk");
            unpack_chunk(self.packing, bytes, &mut chunk_values[..len]);
            let n = dst.len().min(len);
            dst[..n].copy_from_slice(&chunk_values[..n]);
        }
    }

    /// Packs rows given already in the chunk layout: `fill(r, out)` writes
    /// row `r`'s chunks.
    fn from_chunks(n: usize, k: usize, rows: usize, packing: Packing, scale: f32, mut fill: impl FnMut(usize, &mut [u8])) -> PackedTernary {
        let kp = packing.padded(k);
        let chunks = kp / packing.chunk();
        // Padding (rows past n, weights past k) holds code 1, the value 0.
        let zero = match packing {
            Packing::Bits2 => 0x55u8,
            Packing::Base3 => base3::encode([1; 5]),
        };
        // Written where the kernels will read it (see `Blob::build`).
        let data = Blob::build(n.div_ceil(rows) * rows * chunks * CHUNK_BYTES, |data| {
            data.fill(zero);
            let mut row = vec![zero; chunks * CHUNK_BYTES];
            for r in 0..n {
                fill(r, &mut row);
                let (tile, in_tile) = (r / rows, r % rows);
                for (c, chunk) in row.chunks_exact(CHUNK_BYTES).enumerate() {
                    let at = ((tile * chunks + c) * rows + in_tile) * CHUNK_BYTES;
                    data[at..at + CHUNK_BYTES].copy_from_slice(chunk);
                }
            }
        });
        PackedTernary { n, k, kp, rows, packing, scale, data }
    }

    /// Repacks a stored ternary tensor (I2_S, TQ2_0, TQ1_0). The kernels
    /// apply one scale per tensor: blocks of a TQ tensor must share theirs
    /// (all-zero blocks, whose scale does not matter, excepted).
    pub fn from_weight(w: &WeightView, rows: usize) -> Result<PackedTernary, String> {
        match w.dtype {
            DType::I2S => Ok(PackedTernary::from_i2s(w, rows)),
            DType::TQ2_0 => PackedTernary::from_tq2(w, rows).map_or_else(|| PackedTernary::from_blocks(w, rows), Ok),
            _ => PackedTernary::from_blocks(w, rows),
        }
    }

    /// I2_S is this layout already, byte for byte, except that its unused
    /// code 3 means 0.
    fn from_i2s(w: &WeightView, rows: usize) -> PackedTernary {
        let lut = byte_lut(false);
        let scale = w.row(0).tensor_scale;
        PackedTernary::from_chunks(w.rows(), w.row_len(), rows, Packing::Bits2, scale, |r, out| {
            for (o, &b) in out.iter_mut().zip(w.row(r).bytes) {
                *o = lut[b as usize];
            }
        })
    }

    /// TQ2_0 holds the same four weights per byte in the opposite bit
    /// order. `None` when the fast path does not apply (a code 3, or block
    /// scales that differ, which [`PackedTernary::from_blocks`] explains).
    fn from_tq2(w: &WeightView, rows: usize) -> Option<PackedTernary> {
        let lut = byte_lut(true);
        let mut scale: Option<u16> = None;
        let mut ok = true;
        let packed = PackedTernary::from_chunks(w.rows(), w.row_len(), rows, Packing::Bits2, 0.0, |r, out| {
            for (blk, o) in w.row(r).bytes.chunks_exact(66).zip(out.chunks_exact_mut(64)) {
                let d = u16::from_le_bytes([blk[64], blk[65]]);
                if blk[..64].iter().any(|&b| b & 0x03 == 3 || b & 0x0c == 0x0c || b & 0x30 == 0x30 || b & 0xc0 == 0xc0) {
                    ok = false;
                }
                if blk[..64].iter().any(|&b| b != 0x55) {
                    ok &= *scale.get_or_insert(d) == d;
                }
                for (o, &b) in o.iter_mut().zip(&blk[..64]) {
                    *o = lut[b as usize];
                }
            }
        });
        let scale = half::f16::from_bits(scale.unwrap_or(0)).to_f32();
        ok.then_some(PackedTernary { scale, ..packed })
    }

    /// Any ternary type, one row of values at a time.
    fn from_blocks(w: &WeightView, rows: usize) -> Result<PackedTernary, String> {
        let (n, k) = (w.rows(), w.row_len());
        let mut scale: Option<f32> = None;
        let mut scales = Vec::new();
        let mut err = None;
        let packed = PackedTernary::from_rows(n, k, rows, 0.0, |r, out| {
            let block = w.row(r).ternary(out, &mut scales);
            for (b, &d) in scales.iter().enumerate() {
                let zero = out[b * block..((b + 1) * block).min(k)].iter().all(|&c| c == 0);
                match scale {
                    _ if zero => {}
                    None => scale = Some(d),
                    Some(s) if s.to_bits() == d.to_bits() => {}
                    Some(s) if err.is_none() => err = Some(format!("row {r}, block {b} has scale {d} where earlier blocks have {s}")),
                    Some(_) => {}
                }
            }
        });
        match err {
            Some(e) => Err(format!("per-block scales differ ({e}); the compiled kernels need one scale per tensor (run it with --backend interp)")),
            None => Ok(PackedTernary { scale: scale.unwrap_or(0.0), ..packed }),
        }
    }

    /// A packed matrix whose bytes were stored earlier (an artifact),
    /// checked to be the size the layout implies.
    pub fn from_parts(n: usize, k: usize, rows: usize, packing: Packing, scale: f32, data: Blob<u8>) -> Result<PackedTernary, String> {
        if !TernaryTiles::ROWS.contains(&rows) || n == 0 || k == 0 {
            return Err(format!("packed ternary [{n}, {k}] with {rows} rows per tile is not a layout the kernels know"));
        }
        let kp = packing.padded(k);
        let want = n.div_ceil(rows) * rows * (kp / packing.chunk()) * CHUNK_BYTES;
        if data.len() != want {
            return Err(format!("packed ternary [{n}, {k}] ({}) needs {want} bytes, got {}", packing.name(), data.len()));
        }
        Ok(PackedTernary { n, k, kp, rows, packing, scale, data })
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The packed bytes, tile after tile.
    pub fn data(&self) -> &Blob<u8> {
        &self.data
    }

    fn chunks(&self) -> usize {
        self.kp / self.packing.chunk()
    }

    pub(super) fn tile(&self, t: usize) -> &[u8] {
        let len = self.rows * self.chunks() * CHUNK_BYTES;
        &self.data[t * len..(t + 1) * len]
    }
}

/// Activations quantized to int8 per token, padded with zeros to `kp`,
/// with each token's γ and `Σ q`.
#[derive(Clone, Debug, Default)]
pub struct QuantActs {
    pub k: usize,
    pub kp: usize,
    /// Row `t` at `t · kp`. The buffer starts on a cache line, so rows are
    /// 32-byte aligned (`kp` is a multiple of 32), on a line where `kp` is a
    /// multiple of 64 (2B4T's 2560 and 7040 are).
    pub q: LineVec<i8>,
    pub gamma: Vec<f32>,
    pub sum: Vec<i32>,
}

impl QuantActs {
    pub fn tokens(&self) -> usize {
        self.gamma.len()
    }
    /// Sizes the buffers for `s` tokens of `k` values, each row's padding
    /// zero. The values themselves are left for the caller to write: a
    /// decode step reuses its buffer, which need not be cleared each call.
    pub fn resize(&mut self, s: usize, k: usize) {
        self.k = k;
        self.kp = padded_acts(k);
        self.q.resize(s * self.kp, 0);
        if self.kp > k {
            for row in self.q.chunks_exact_mut(self.kp) {
                row[k..].fill(0);
            }
        }
        self.gamma.resize(s, 0.0);
        self.sum.resize(s, 0);
    }
    #[inline]
    pub fn row(&self, t: usize) -> &[i8] {
        &self.q[t * self.kp..(t + 1) * self.kp]
    }
    /// The rows of tokens `tok..tok + step` as the tile kernels read them:
    /// four pointers, the last row repeated past `step`.
    #[inline]
    pub(super) fn step_rows(&self, tok: usize, step: usize) -> [*const i8; 4] {
        std::array::from_fn(|j| self.row(tok + j.min(step - 1)).as_ptr())
    }
}

/// Prefetches the weights of a tile of `rows` rows ahead of chunk `c`
/// ([`super::prefetch_stream`]: two cache lines for tiles of more than two
/// rows, which read two a chunk).
///
/// # Safety
/// `w` points into the tile; a prefetch past its end is harmless.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn prefetch_ahead(w: *const u8, c: usize, rows: usize) {
    let at = w.wrapping_add(c * rows * CHUNK_BYTES);
    if rows > 2 {
        super::prefetch_stream::<2>(at);
    } else {
        super::prefetch_stream::<1>(at);
    }
}

/// Byte translation into this layout: each 2-bit field's code 3 becomes
/// 1 (the value 0), and with `reverse` the four fields swap end for end.
fn byte_lut(reverse: bool) -> [u8; 256] {
    std::array::from_fn(|b| {
        let field = |i: usize| match (b >> (2 * i)) & 3 {
            3 => 1,
            c => c as u8,
        };
        let f: [u8; 4] = std::array::from_fn(field); // f[i] at bits 2i+1:2i
        if reverse {
            f[0] << 6 | f[1] << 4 | f[2] << 2 | f[3]
        } else {
            f[3] << 6 | f[2] << 4 | f[1] << 2 | f[0]
        }
    })
}

/// `out[t, n] = epilogue(x[t] · w[n])` for all tokens and rows, split
/// over the pool's workers by row tiles or by tokens (`tiles.split`).
pub fn matmul(pool: &Pool, tiles: TernaryTiles, w: &PackedTernary, x: &QuantActs, out: &mut [f32], ep: Epilogue) {
    products(
        pool,
        tiles,
        &[[w]],
        x,
        out,
        |tile| finish_blocks(tiles.isa, x, w, &ep, tile.blocks().map(|([dots], block)| (dots, block))),
        |_, run| finish_rows(tiles.isa, run.sums[0], x, 0, w, &ep, run.n, run.out),
    );
}

/// The products of one activation with several matrices (`(weight, s)`
/// each: q, k and v), their results side by side in each row of `out`:
/// [`matmul`] of each with scale `s`, as one pass handed out to the workers.
pub fn matmul_cat(pool: &Pool, tiles: TernaryTiles, parts: &[(&PackedTernary, Option<f32>)], x: &QuantActs, out: &mut [f32]) {
    let groups: Vec<[&PackedTernary; 1]> = parts.iter().map(|p| [p.0]).collect();
    let eps: Vec<Epilogue> = parts.iter().map(|p| Epilogue { scale: p.1, residual: None }).collect();
    products(
        pool,
        tiles,
        &groups,
        x,
        out,
        |tile| finish_blocks(tiles.isa, x, parts[tile.g].0, &eps[tile.g], tile.blocks().map(|([dots], block)| (dots, block))),
        |g, run| finish_rows(tiles.isa, run.sums[0], x, 0, parts[g].0, &eps[g], run.n, run.out),
    );
}

/// `out[t, n] = act(x[t] · gate[n] · β_g · s_g) · (x[t] · up[n] · β_u · s_u)`:
/// the gate and up products of a gated unit in one pass over the
/// activations, `(weight, s)` each, with the unit applied as each tile's
/// results leave the registers (one token: as each run of tiles' results
/// do). The same arithmetic as [`matmul`] twice and then `glu`.
pub fn matmul_glu(
    pool: &Pool,
    tiles: TernaryTiles,
    act: GateAct,
    gate: (&PackedTernary, Option<f32>),
    up: (&PackedTernary, Option<f32>),
    x: &QuantActs,
    out: &mut [f32],
) {
    let (wg, wu) = (gate.0, up.0);
    assert!(wg.n == wu.n, "ternary glu: gate and up differ in rows");
    let (eg, eu) = (Epilogue { scale: gate.1, residual: None }, Epilogue { scale: up.1, residual: None });
    let unit = GluUnit { act, gate: (wg, &eg), up: (wu, &eu) };
    let finish = |tile: TileBlocks<2>| finish_glu_blocks(tiles.isa, unit, x, tile.blocks().map(|([g, u], block)| (g, u, block)));
    products(pool, tiles, &[[wg, wu]], x, out, finish, |_, run| {
        let len = run.out.len();
        let (mut g, mut u) = ([0f32; RUN_ROWS], [0f32; RUN_ROWS]);
        finish_rows(tiles.isa, run.sums[0], x, 0, wg, &eg, run.n, &mut g[..len]);
        finish_rows(tiles.isa, run.sums[1], x, 0, wu, &eu, run.n, &mut u[..len]);
        vmath::glu(tiles.isa, act, &g[..len], &u[..len], run.out);
    });
}

/// One kernel call's sums for each of a group's `M` matrices: `[m][r][j]`,
/// row `r` of the tile and token `j` of the call.
type CallDots<const M: usize> = [[[i32; 4]; 4]; M];

/// Tiles whose sums one token (decode) gathers before finishing them all
/// at once ([`RowRun`]).
const RUN_TILES: usize = 16;

/// Rows of a [`RUN_TILES`] run, at most.
const RUN_ROWS: usize = 4 * RUN_TILES;

/// One token's sums for a run of a group's rows, and where their results
/// go: `sums[m]` holds matrix `m`'s sums for the rows `n..` (the last
/// tile's rows past the matrix included), `out` the results of those rows
/// that exist. A tile's own epilogue, between two tiles' kernel calls,
/// held up the stream of weights: without any, one token's product read
/// about 9% faster. Finished a run at a time, vectorized across the rows,
/// they cost little; the 2-bit VNNI and 1.6-bit VBMI kernels of 2- and
/// 4-row tiles also loop over the run's tiles themselves
/// (docs/performance.md, session of 2026-12-06, nineteenth).
struct RowRun<'a, const M: usize> {
    n: usize,
    sums: [&'a [i32]; M],
    out: &'a mut [f32],
}

/// A tile's kernel calls, `(tok, step, dots)` each, as [`products`] hands
/// them on to be finished: tile `t` of group `g`.
struct TileBlocks<'a, const M: usize> {
    g: usize,
    t: usize,
    calls: &'a [(usize, usize, CallDots<M>)],
    places: &'a Places<'a, M>,
}

impl<'a, const M: usize> TileBlocks<'a, M> {
    /// Each call's dots and where its results go.
    fn blocks(&self) -> impl Iterator<Item = (&'a CallDots<M>, Block)> + '_ {
        self.calls.iter().map(|(tok, step, dots)| (dots, self.places.block(self.g, self.t, *tok, *step)))
    }
}

/// Where a product's groups of matrices lie among its row tiles and in its
/// output: group `g`'s tiles are the global tiles `first[g].0..first[g + 1].0`,
/// its results the columns `first[g].1..first[g + 1].1` of `out`'s rows.
struct Places<'a, const M: usize> {
    groups: &'a [[&'a PackedTernary; M]],
    /// Per group (and one past the last): its first tile and first column.
    first: Vec<(usize, usize)>,
    /// The output, borrowed for as long as the places are: each block's
    /// results go through a pointer into it.
    out: SharedMut<f32>,
    borrow: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a, const M: usize> Places<'a, M> {
    fn new(groups: &'a [[&'a PackedTernary; M]], out: &'a mut [f32]) -> Places<'a, M> {
        let mut first = vec![(0usize, 0usize)];
        for g in groups {
            let &(t, c) = first.last().expect("starts with one");
            first.push((t + g[0].n.div_ceil(g[0].rows), c + g[0].n));
        }
        Places { groups, first, out: SharedMut(out.as_mut_ptr()), borrow: std::marker::PhantomData }
    }

    /// Row tiles in all.
    fn tiles(&self) -> usize {
        self.first[self.groups.len()].0
    }

    /// Columns of the output in all.
    fn width(&self) -> usize {
        self.first[self.groups.len()].1
    }

    /// The group of global tile `t`, and `t`'s index within it.
    fn tile(&self, t: usize) -> (usize, usize) {
        let g = self.first.partition_point(|f| f.0 <= t) - 1;
        (g, t - self.first[g].0)
    }

    /// One past group `g`'s last global tile.
    fn group_end(&self, g: usize) -> usize {
        self.first[g + 1].0
    }

    /// Tile `t` of group `g` (its index within the group) against tokens
    /// `tok..tok + tokens`.
    fn block(&self, g: usize, t: usize, tok: usize, tokens: usize) -> Block {
        let rows = self.groups[g][0].rows;
        let (n, width) = (t * rows, self.width());
        let len = rows.min(self.groups[g][0].n - n);
        Block { tok, tokens, n, first: self.out.ptr().wrapping_add(tok * width + self.first[g].1 + n), stride: width, len }
    }
}

impl<const M: usize> Places<'_, M> {
    /// Token 0's results for the rows of group `g` from tile `t`'s first
    /// on, `len` of them.
    ///
    /// # Safety
    /// No other slice of the output that these rows overlap is alive: each
    /// tile is handed to one worker, which takes its rows once.
    #[allow(clippy::mut_from_ref)]
    unsafe fn token0_rows(&self, g: usize, t: usize, len: usize) -> &mut [f32] {
        let n = t * self.groups[g][0].rows;
        assert!(n + len <= self.groups[g][0].n, "a run of rows past its matrix");
        // SAFETY: the rows are inside `out` (token 0's row holds every
        // group's columns); the caller keeps them to itself.
        unsafe { std::slice::from_raw_parts_mut(self.out.ptr().add(self.first[g].1 + n), len) }
    }
}

/// The loop shared by the products: every row tile of each group of `M`
/// matrices (same shape within a group, one layout for all) against every
/// token, split over the workers. Each group's results take the next
/// columns of `out`'s rows. `write(tile)` turns the dots of a tile's
/// kernel calls (each `dots[m][r][j]`: matrix `m` of the group, row
/// `block.n + r`, token `block.tok + j`) into the blocks' results;
/// `write_rows(group, run)` does the same for one token's run of rows, the
/// same arithmetic on each (decode's products finish so).
fn products<const M: usize>(
    pool: &Pool,
    tiles: TernaryTiles,
    groups: &[[&PackedTernary; M]],
    x: &QuantActs,
    out: &mut [f32],
    write: impl Fn(TileBlocks<M>) + Sync,
    write_rows: impl Fn(usize, RowRun<M>) + Sync,
) {
    let w = groups[0][0];
    let same = groups.iter().all(|g| g.iter().all(|v| v.n == g[0].n && v.rows == w.rows && v.packing == w.packing && v.kp == w.kp));
    let out_len = out.len();
    let places = Places::new(groups, out);
    assert!(
        same && tiles.rows == w.rows && tiles.packing == w.packing && x.kp >= w.kp && out_len == x.tokens() * places.width(),
        "ternary matmul: mismatched operands"
    );
    assert!(tiles.isa.available(), "ternary matmul: {} is not available on this CPU", tiles.isa.name());
    // Many tokens go to AMX tiles where the CPU has them.
    #[cfg(target_arch = "x86_64")]
    if tiles.isa == Isa::Avx512Vnni && amx::fits(w) && (w.packing == Packing::Bits2 || unpacks_in_rows(w)) && x.tokens() >= amx::MIN_TOKENS && amx::available()
    {
        return amx_products(pool, &places, x, &write);
    }
    // The 1.6-bit VNNI kernel reads the activations rearranged, once for all rows.
    let digits = (w.packing == Packing::Base3 && tiles.isa == Isa::Avx512Vnni && !vbmi(w)).then(|| base3::DigitActs::new(x, w.kp));
    let one_token = x.tokens() == 1;
    let by_tokens = tiles.split == Split::Tokens && x.tokens() >= pool.threads() && !one_token;
    let chunks = Chunks::new(places.tiles(), pool.threads());
    pool.run_sized(x.tokens() * places.width() * w.kp * M, &|me, workers| {
        let mut codes: [LineVec<u8>; M] = std::array::from_fn(|_| LineVec::new());
        // A tile's kernel calls, `(tok, step, dots)`, all made before any
        // epilogue: the epilogues then run back to back, their divisions
        // overlapping, instead of each waiting between two kernel calls.
        let mut blocks: Vec<(usize, usize, CallDots<M>)> = Vec::new();
        let mut tile = |global: usize, tokens: std::ops::Range<usize>| {
            let (g, t) = places.tile(global);
            let ws = &groups[g];
            let unpack = tiles.tokens > 1 && tokens.len() >= tiles.tokens;
            let unpacked: [Option<Unpacked>; M] = std::array::from_fn(|m| if unpack { unpack_tile(tiles.isa, ws[m], t, &mut codes[m]) } else { None });
            blocks.clear();
            let mut tok = tokens.start;
            while tok < tokens.end {
                let step = if tokens.end - tok >= tiles.tokens { tiles.tokens } else { 1 };
                blocks.push((tok, step, [[[0; 4]; 4]; M]));
                tok += step;
            }
            for m in 0..M {
                blocks_dots(tiles.isa, ws[m], t, unpacked[m].map(|u| (u, &codes[m][..])), x, digits.as_ref(), m, &mut blocks);
            }
            write(TileBlocks { g, t, calls: &blocks, places: &places });
        };
        if by_tokens {
            let tokens = share(x.tokens(), me, workers);
            (0..places.tiles()).for_each(|t| tile(t, tokens.clone()));
        } else if one_token {
            let mut sums = [[0i32; RUN_ROWS]; M];
            while let Some(range) = chunks.next() {
                let mut at = range.start;
                while at < range.end {
                    let (g, t) = places.tile(at);
                    let run = RUN_TILES.min(range.end - at).min(places.group_end(g) - at);
                    let ws = &groups[g];
                    for (m, sums) in sums.iter_mut().enumerate() {
                        run_sums(tiles.isa, ws[m], t..t + run, x, digits.as_ref(), sums);
                    }
                    let rows = (run * ws[0].rows).min(ws[0].n - t * ws[0].rows);
                    // SAFETY: the run's tiles were handed to this worker alone.
                    let out = unsafe { places.token0_rows(g, t, rows) };
                    write_rows(g, RowRun { n: t * ws[0].rows, sums: std::array::from_fn(|m| &sums[m][..]), out });
                    at += run;
                }
            }
        } else {
            while let Some(range) = chunks.next() {
                range.for_each(|t| tile(t, 0..x.tokens()));
            }
        }
    });
}

/// [`products`] on AMX tiles: calls of up to 64 rows (several of the
/// layout's tiles, all of one group), each multiplied by every token at
/// once, then finished four tokens a block as the other kernels' are.
#[cfg(target_arch = "x86_64")]
fn amx_products<const M: usize>(pool: &Pool, places: &Places<M>, x: &QuantActs, write: &(impl Fn(TileBlocks<M>) + Sync)) {
    let w = places.groups[0][0];
    let acts = amx::Acts::new(x, w.kp);
    let (s, per_call, n_tiles) = (x.tokens(), amx::CALL_ROWS / w.rows, places.tiles());
    let chunks = Chunks::new(n_tiles.div_ceil(per_call), pool.threads());
    pool.run_sized(s * places.width() * w.kp * M, &|_, _| {
        let mut worker = amx::Worker::new(w.kp);
        let mut sums = vec![0i32; M * amx::CALL_ROWS * s];
        let mut blocks = Vec::with_capacity(s.div_ceil(4));
        while let Some(calls) = chunks.next() {
            let tiles = calls.start * per_call..(calls.end * per_call).min(n_tiles);
            let mut t0 = tiles.start;
            while t0 < tiles.end {
                // The next tiles of one group, at most one call's.
                let (g, local0) = places.tile(t0);
                let t1 = tiles.end.min(places.group_end(g)).min(t0 + per_call);
                let local = local0..local0 + (t1 - t0);
                for (m, sums) in sums.chunks_exact_mut(amx::CALL_ROWS * s).enumerate() {
                    worker.dots(places.groups[g][m], local.clone(), &acts, sums);
                }
                for (q, t) in local.enumerate() {
                    blocks.clear();
                    for tok in (0..s).step_by(4) {
                        let step = 4.min(s - tok);
                        let at = |m: usize, r: usize, j: usize| sums[(m * amx::CALL_ROWS + q * w.rows + r) * s + tok + j];
                        let dots: CallDots<M> =
                            std::array::from_fn(|m| std::array::from_fn(|r| std::array::from_fn(|j| if r < w.rows && j < step { at(m, r, j) } else { 0 })));
                        blocks.push((tok, step, dots));
                    }
                    write(TileBlocks { g, t, calls: &blocks, places });
                }
                t0 = t1;
            }
        }
    });
}

/// Whose layout a tile's unpacked codes have, and so which kernel reads them.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Unpacked {
    /// [`avx2::unpack`]'s, for [`avx2::unpacked_steps`].
    Avx2,
    /// `base3::vbmi_unpack`'s, for `base3::vnni_unpacked_dots`.
    Vbmi,
}

/// Prefill on AVX2 (and of 1.6-bit weights on AVX-512 VNNI) first unpacks
/// a tile's codes to one byte each ([`avx2::unpack`], or with VBMI
/// `base3::vbmi_unpack`), once for all its tokens, so that the inner loop
/// is only multiplies and adds. `None` where the ISA reads packed codes.
fn unpack_tile(isa: Isa, w: &PackedTernary, t: usize, codes: &mut LineVec<u8>) -> Option<Unpacked> {
    match (isa, w.packing) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, Packing::Base3) if vbmi(w) => {
            base3::vbmi_unpack(w.rows, w.tile(t), w.chunks(), codes);
            Some(Unpacked::Vbmi)
        }
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, _) | (Isa::Avx512Vnni, Packing::Base3) => {
            avx2::unpack(w.rows, w.packing, w.tile(t), w.chunks(), codes);
            Some(Unpacked::Avx2)
        }
        _ => None,
    }
}

/// Tile `t` of 1.6-bit weights as codes one byte each, row after row
/// (`w.kp` a row): AMX's tiles take them so. Only where
/// [`unpacks_in_rows`].
#[cfg(target_arch = "x86_64")]
pub(super) fn unpack_base3(w: &PackedTernary, t: usize, codes: &mut LineVec<u8>) {
    assert!(w.packing == Packing::Base3 && unpacks_in_rows(w), "unpack_base3: {:?} weights in tiles of {} rows", w.packing, w.rows);
    assert!(unpack_tile(Isa::Avx512Vnni, w, t, codes).is_some(), "1.6-bit weights unpack on AVX-512 VNNI");
}

/// Whether [`unpack_tile`] writes `w`'s 1.6-bit codes row after row:
/// VBMI's unpacking does, AVX2's only for tiles of one row (it interleaves
/// the rows of bigger ones, 32 codes at a time).
#[cfg(target_arch = "x86_64")]
fn unpacks_in_rows(w: &PackedTernary) -> bool {
    w.rows == 1 || vbmi(w)
}

/// [`tile_dots`] for each of a tile's `blocks` (`(tok, step, dots)`), into
/// `dots[m]`. AVX2's unpacked GEMM takes all of the steps of more than one
/// token in a single call: called a step at a time, the calls cost 7% of a
/// `[2560, 2560]` product on 128 tokens (tiles of 4 rows × 2 tokens, Zen 3).
#[allow(clippy::too_many_arguments)]
fn blocks_dots<const M: usize>(
    isa: Isa,
    w: &PackedTernary,
    t: usize,
    codes: Option<(Unpacked, &[u8])>,
    x: &QuantActs,
    digits: Option<&base3::DigitActs>,
    m: usize,
    blocks: &mut [(usize, usize, CallDots<M>)],
) {
    #[cfg(target_arch = "x86_64")]
    if let Some((Unpacked::Avx2, codes)) = codes {
        avx2::unpacked_steps(w.rows, codes, w.chunks() * w.packing.groups(), x, m, blocks);
        for (tok, _, dots) in blocks.iter_mut().filter(|b| b.1 == 1) {
            tile_dots(isa, w, t, None, x, digits, *tok, 1, &mut dots[m]);
        }
        return;
    }
    let codes = codes.map(|(_, codes)| codes);
    for (tok, step, dots) in blocks.iter_mut() {
        tile_dots(isa, w, t, codes, x, digits, *tok, *step, &mut dots[m]);
    }
}

/// The code-times-activation sums of tile `t` against tokens `tok..tok+step`,
/// from the tile's `codes` where VBMI unpacked them ([`blocks_dots`] sends
/// AVX2's unpacked codes to their GEMM; here they would go unread).
#[allow(clippy::too_many_arguments)]
fn tile_dots(
    isa: Isa,
    w: &PackedTernary,
    t: usize,
    codes: Option<&[u8]>,
    x: &QuantActs,
    digits: Option<&base3::DigitActs>,
    tok: usize,
    step: usize,
    dots: &mut [[i32; 4]; 4],
) {
    match (isa, w.packing) {
        (Isa::Scalar, _) => reference_dots(w, t, x, tok, step, dots),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, Packing::Base3) if codes.is_some() && step > 1 && vbmi(w) => {
            base3::vnni_unpacked_dots(w.rows, step, codes.expect("checked"), w.chunks(), x, tok, dots)
        }
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Packing::Bits2) => avx2::dots(w.rows, step, w.tile(t), w.chunks(), x, tok, dots),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, Packing::Bits2) => super::vnni::dots(w.rows, step, w.tile(t), w.chunks(), x, tok, dots),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Packing::Base3) => base3::avx2_dots(w.rows, step, w.tile(t), w.chunks(), x, tok, dots),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, Packing::Base3) if vbmi(w) => base3::vbmi_dots(w.rows, step, w.tile(t), w.chunks(), x, tok, dots),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, Packing::Base3) => base3::vnni_dots(w.rows, step, w.tile(t), w.chunks(), digits.expect("made by products"), tok, dots),
        (Isa::Cranelift, Packing::Bits2) => jit_dots(w, t, x, tok, step, dots),
        #[allow(unreachable_patterns)]
        _ => unreachable!("checked by matmul"),
    }
}

/// One token's sums for the tiles `tiles` of `w`, row by row into `sums`
/// (tile `t`'s rows from `(t - tiles.start) · rows` on).
fn run_sums(isa: Isa, w: &PackedTernary, tiles: std::ops::Range<usize>, x: &QuantActs, digits: Option<&base3::DigitActs>, sums: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && matches!(w.rows, 2 | 4) {
        let len = w.tile(0).len();
        let (bytes, run) = (&w.data[tiles.start * len..tiles.end * len], &mut sums[..tiles.len() * w.rows]);
        match w.packing {
            Packing::Bits2 => return super::vnni::run_sums(w.rows, bytes, w.chunks(), x, run),
            Packing::Base3 if vbmi(w) => return base3::vbmi_run_sums(w.rows, bytes, w.chunks(), x, run),
            Packing::Base3 => {}
        }
    }
    for (i, t) in tiles.enumerate() {
        let mut dots = [[0; 4]; 4];
        tile_dots(isa, w, t, None, x, digits, 0, 1, &mut dots);
        for (r, s) in sums[i * w.rows..(i + 1) * w.rows].iter_mut().enumerate() {
            *s = dots[r][0];
        }
    }
}

/// Whether the 1.6-bit VNNI products of `w` look their digits up in tables
/// (AVX-512 VBMI, tiles of 2 or 4 rows) instead of multiplying them out.
fn vbmi(w: &PackedTernary) -> bool {
    #[cfg(target_arch = "x86_64")]
    return base3::has_vbmi_kernel(w.rows);
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// The Cranelift-generated kernel of this tile shape.
fn jit_dots(w: &PackedTernary, t: usize, x: &QuantActs, tok: usize, step: usize, dots: &mut [[i32; 4]; 4]) {
    let jit = super::jit::TernaryJit::get().expect("checked by matmul: Isa::Cranelift is available");
    let xs = x.step_rows(tok, step);
    let tile = w.tile(t);
    // SAFETY: the tile holds `rows × chunks` chunks and each activation
    // row `kp = chunks × 128` bytes, as the generated code reads them.
    unsafe { jit.dots(w.rows, step)(tile.as_ptr(), w.chunks(), xs.as_ptr(), dots.as_mut_ptr() as *mut i32) };
}

/// The plain kernel: unpack each code and multiply.
fn reference_dots(w: &PackedTernary, t: usize, x: &QuantActs, tok: usize, step: usize, dots: &mut [[i32; 4]; 4]) {
    let tile = w.tile(t);
    for (r, row) in dots.iter_mut().enumerate().take(w.rows) {
        for (j, out) in row.iter_mut().enumerate().take(step) {
            let xs = x.row(tok + j);
            let mut dot = 0i32;
            for c in 0..w.chunks() {
                let bytes = &tile[(c * w.rows + r) * CHUNK_BYTES..][..CHUNK_BYTES];
                for (b, &byte) in bytes.iter().enumerate() {
                    for g in 0..w.packing.groups() {
                        dot += code(w.packing, byte, g) as i32 * xs[c * w.packing.chunk() + 32 * g + b] as i32;
                    }
                }
            }
            *out = dot;
        }
    }
}

/// One chunk's values (−1, 0, 1; `packing.chunk()` of them) packed into
/// its 32 bytes. Each packing's loop is written apart, a whole chunk at a
/// time, so that the compiler vectorizes it: a 2B4T model's repacking into
/// 1.6 bits at load took seconds value by value.
fn pack_chunk(packing: Packing, vals: &[i8], out: &mut [u8; CHUNK_BYTES]) {
    match packing {
        Packing::Bits2 => {
            let v: &[[i8; CHUNK_BYTES]; 4] = vals.as_chunks().0.try_into().expect("a 2-bit chunk");
            for (j, byte) in out.iter_mut().enumerate() {
                let code = |g: usize| (v[g][j] + 1) as u8;
                *byte = code(0) << 6 | code(1) << 4 | code(2) << 2 | code(3);
            }
        }
        Packing::Base3 => {
            let v: &[[i8; CHUNK_BYTES]; 5] = vals.as_chunks().0.try_into().expect("a 1.6-bit chunk");
            for (j, byte) in out.iter_mut().enumerate() {
                let number = v.iter().fold(0u32, |n, g| n * 3 + (g[j] + 1) as u32);
                *byte = base3::from_number(number);
            }
        }
    }
}

/// The inverse of [`pack_chunk`], by each packing's reference rule.
fn unpack_chunk(packing: Packing, bytes: &[u8; CHUNK_BYTES], vals: &mut [i8]) {
    let (groups, _) = vals.as_chunks_mut::<CHUNK_BYTES>();
    for (g, vals) in groups.iter_mut().enumerate() {
        match packing {
            Packing::Bits2 => {
                // Eight bytes at a time: each one's field `g`, less one
                // (`c + 0x7F` carries into no other byte; `^ 0x80` takes off 0x80).
                let shift = 6 - 2 * g as u32;
                for (v, b) in vals.as_chunks_mut::<8>().0.iter_mut().zip(bytes.as_chunks::<8>().0) {
                    let fields = (u64::from_le_bytes(*b) >> shift) & 0x0303_0303_0303_0303;
                    *v = ((fields + 0x7F7F_7F7F_7F7F_7F7F) ^ 0x8080_8080_8080_8080).to_le_bytes().map(|c| c as i8);
                }
            }
            Packing::Base3 => {
                for (v, &b) in vals.iter_mut().zip(bytes) {
                    *v = base3::decode(b, g) as i8 - 1;
                }
            }
        }
    }
}

/// Code `g` (weight `j + 32·g` of a chunk whose byte `j` this is) of a
/// packed byte: the reference rule of each packing.
fn code(packing: Packing, byte: u8, g: usize) -> u8 {
    match packing {
        Packing::Bits2 => (byte >> (6 - 2 * g)) & 3,
        Packing::Base3 => base3::decode(byte, g),
    }
}

/// `run::<R, T>(args)` for the tile shape `(rows, step)`, each of 1, 2 or 4:
/// the packed-code kernels are generic over both.
#[cfg(target_arch = "x86_64")]
macro_rules! for_tile_shape {
    ($rows:expr, $step:expr, $run:ident($($arg:expr),*)) => {
        match ($rows, $step) {
            (1, 1) => $run::<1, 1>($($arg),*),
            (1, 2) => $run::<1, 2>($($arg),*),
            (1, 4) => $run::<1, 4>($($arg),*),
            (2, 1) => $run::<2, 1>($($arg),*),
            (2, 2) => $run::<2, 2>($($arg),*),
            (2, 4) => $run::<2, 4>($($arg),*),
            (4, 1) => $run::<4, 1>($($arg),*),
            (4, 2) => $run::<4, 2>($($arg),*),
            (4, 4) => $run::<4, 4>($($arg),*),
            _ => unreachable!("tiles are validated"),
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(super) use for_tile_shape;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{base3, CallDots, LineVec, Packing, QuantActs, CHUNK, CHUNK_BYTES};
    use std::arch::x86_64::*;

    pub(super) fn dots(rows: usize, step: usize, tile: &[u8], chunks: usize, x: &QuantActs, tok: usize, out: &mut [[i32; 4]; 4]) {
        let xs = x.step_rows(tok, step);
        // SAFETY: `matmul` checked that AVX2 is present; `tile` holds
        // `chunks` chunks of `rows` rows and every activation row `kp` values.
        unsafe { for_tile_shape!(rows, step, run(tile, chunks, &xs, out)) }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn run<const R: usize, const T: usize>(tile: &[u8], chunks: usize, xs: &[*const i8; 4], out: &mut [[i32; 4]; 4]) {
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); T]; R];
        let w = tile.as_ptr();
        for c in 0..chunks {
            super::prefetch_ahead(w, c, R);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let b = _mm256_loadu_si256(w.add((c * R + r) * CHUNK_BYTES) as *const __m256i);
                let w0 = _mm256_and_si256(_mm256_srli_epi16::<6>(b), mask);
                let w1 = _mm256_and_si256(_mm256_srli_epi16::<4>(b), mask);
                let w2 = _mm256_and_si256(_mm256_srli_epi16::<2>(b), mask);
                let w3 = _mm256_and_si256(b, mask);
                for (j, a) in acc_r.iter_mut().enumerate() {
                    let xp = xs[j].add(c * CHUNK) as *const __m256i;
                    let p0 = _mm256_maddubs_epi16(w0, _mm256_loadu_si256(xp));
                    let p1 = _mm256_maddubs_epi16(w1, _mm256_loadu_si256(xp.add(1)));
                    let p2 = _mm256_maddubs_epi16(w2, _mm256_loadu_si256(xp.add(2)));
                    let p3 = _mm256_maddubs_epi16(w3, _mm256_loadu_si256(xp.add(3)));
                    // |each| ≤ 2·2·128 = 512, their sum ≤ 2048: no i16 overflow.
                    let s = _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(s, ones));
                }
            }
        }
        for r in 0..R {
            for j in 0..T {
                out[r][j] = hsum(acc[r][j]);
            }
        }
    }

    /// Writes a tile's codes one per byte: for each chunk, its code groups
    /// (the weights `32·g..32·g + 32` of the chunk: bits 7:6, 5:4, 3:2, 1:0
    /// of 2-bit bytes, or the five base-3 digits) in turn, each group's rows
    /// one after the other, 32 bytes each.
    pub(super) fn unpack(rows: usize, packing: Packing, tile: &[u8], chunks: usize, codes: &mut LineVec<u8>) {
        assert_eq!(tile.len(), chunks * rows * CHUNK_BYTES);
        codes.resize(packing.groups() * tile.len(), 0);
        // SAFETY: `matmul` checked that AVX2 is present; both lengths are set above.
        unsafe {
            match packing {
                Packing::Bits2 => unpack_avx2(rows, tile, chunks, codes),
                Packing::Base3 => base3::unpack_avx2(rows, tile, chunks, codes),
            }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn unpack_avx2(rows: usize, tile: &[u8], chunks: usize, codes: &mut [u8]) {
        let mask = _mm256_set1_epi8(3);
        let (src, dst) = (tile.as_ptr(), codes.as_mut_ptr());
        for c in 0..chunks {
            for r in 0..rows {
                let b = _mm256_loadu_si256(src.add((c * rows + r) * CHUNK_BYTES) as *const __m256i);
                let groups = [_mm256_srli_epi16::<6>(b), _mm256_srli_epi16::<4>(b), _mm256_srli_epi16::<2>(b), b];
                for (g, v) in groups.into_iter().enumerate() {
                    _mm256_storeu_si256(dst.add(((c * 4 + g) * rows + r) * CHUNK_BYTES) as *mut __m256i, _mm256_and_si256(v, mask));
                }
            }
        }
    }

    /// Prefill from `groups` groups of 32 unpacked codes (see [`unpack`]):
    /// each block of more than one token (`(tok, step, dots)`, all of the
    /// tile's `step`), into `dots[m]`; blocks of one token are left.
    pub(super) fn unpacked_steps<const M: usize>(
        rows: usize,
        codes: &[u8],
        groups: usize,
        x: &QuantActs,
        m: usize,
        blocks: &mut [(usize, usize, CallDots<M>)],
    ) {
        let step = blocks.iter().map(|b| b.1).max().unwrap_or(1);
        assert!(
            codes.len() == groups * rows * CHUNK_BYTES && x.kp >= groups * 32 && blocks.iter().all(|b| (b.1 == 1 || b.1 == step) && b.0 + b.1 <= x.tokens()),
            "avx2 unpacked steps: mismatched operands"
        );
        // SAFETY: `matmul` checked that AVX2 is present; lengths are checked above.
        unsafe {
            match (rows, step) {
                (_, 1) => {}
                (1, 2) => steps::<1, 1, 2, M>(codes, groups, x, m, blocks),
                (1, 4) => steps::<1, 1, 4, M>(codes, groups, x, m, blocks),
                (2, 2) => steps::<2, 2, 2, M>(codes, groups, x, m, blocks),
                (2, 4) => steps::<2, 2, 4, M>(codes, groups, x, m, blocks),
                (4, 2) => steps::<4, 4, 2, M>(codes, groups, x, m, blocks),
                // Sixteen accumulators would not fit in 16 registers: two
                // passes of two rows, the second with the activations in L1
                // still.
                (4, 4) => steps::<4, 2, 4, M>(codes, groups, x, m, blocks),
                _ => unreachable!("tiles are validated"),
            }
        }
    }

    /// [`gemm`] on each block of `T` tokens, in passes of `RS` of the
    /// tile's `RL` rows.
    #[target_feature(enable = "avx2")]
    unsafe fn steps<const RL: usize, const RS: usize, const T: usize, const M: usize>(
        codes: &[u8],
        groups: usize,
        x: &QuantActs,
        m: usize,
        blocks: &mut [(usize, usize, CallDots<M>)],
    ) {
        for (tok, _, dots) in blocks.iter_mut().filter(|b| b.1 == T) {
            let xs = x.step_rows(*tok, T);
            for r0 in (0..RL).step_by(RS) {
                gemm::<RL, RS, T>(codes, r0, groups, &xs, &mut dots[m]);
            }
        }
    }

    /// Code groups whose 16-bit sums may add up before they could overflow:
    /// one group adds between 2 · 2 · (−128) = −512 and 508 to a lane, 64
    /// of them between −32768 and 32512, which i16 holds.
    const I16_GROUPS: usize = 64;

    /// Rows `r0..r0 + RS` of a tile of `RL` rows, against `T` tokens, from
    /// unpacked codes. Written for the 16 registers: `RS · T` ≤ 8 16-bit
    /// accumulators, `RS` code vectors and one activation vector live, so
    /// nothing spills and each 32 products cost one `pmaddubsw` and one
    /// add. Sums widen to 32 bits (`pmaddwd`) every [`I16_GROUPS`] groups.
    #[target_feature(enable = "avx2")]
    unsafe fn gemm<const RL: usize, const RS: usize, const T: usize>(codes: &[u8], r0: usize, groups: usize, xs: &[*const i8; 4], out: &mut [[i32; 4]; 4]) {
        let ones = _mm256_set1_epi16(1);
        let mut wide = [[_mm256_setzero_si256(); T]; RS];
        let w = codes.as_ptr().add(r0 * CHUNK_BYTES);
        let mut g0 = 0;
        while g0 < groups {
            let g1 = (g0 + I16_GROUPS).min(groups);
            let mut acc = [[_mm256_setzero_si256(); T]; RS];
            for g in g0..g1 {
                let at = w.add(g * RL * CHUNK_BYTES);
                let cv: [__m256i; RS] = std::array::from_fn(|r| _mm256_loadu_si256(at.add(r * CHUNK_BYTES) as *const __m256i));
                for j in 0..T {
                    let x = _mm256_loadu_si256(xs[j].add(g * 32) as *const __m256i);
                    for r in 0..RS {
                        acc[r][j] = _mm256_add_epi16(acc[r][j], _mm256_maddubs_epi16(cv[r], x));
                    }
                }
            }
            for r in 0..RS {
                for j in 0..T {
                    wide[r][j] = _mm256_add_epi32(wide[r][j], _mm256_madd_epi16(acc[r][j], ones));
                }
            }
            g0 = g1;
        }
        for r in 0..RS {
            for j in 0..T {
                out[r0 + r][j] = hsum(wide[r][j]);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_hadd_epi32(s, s);
        _mm_cvtsi128_si32(_mm_hadd_epi32(s, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_ir::quant;

    /// A reused buffer keeps its rows' padding zero whatever was there,
    /// and rows of no values are no error.
    #[test]
    fn resized_activations_have_zero_padding() {
        let mut a = QuantActs::default();
        a.resize(3, 700);
        a.q.fill(-1);
        for (s, k) in [(3, 700), (2, 3), (4, 783), (1, 0)] {
            a.resize(s, k);
            assert_eq!(a.q.len(), s * a.kp);
            assert!(a.q.chunks_exact(a.kp.max(1)).all(|row| row[k..].iter().all(|&v| v == 0)), "s {s} k {k}");
            a.q.fill(-1);
        }
    }

    /// The byte-translating fast paths give the same packing as decoding
    /// every value.
    #[test]
    fn fast_repacking_equals_the_generic_one() {
        let (n, k) = (5, 512);
        let values: Vec<f32> = (0..n * k).map(|i| ((i * 7 + i / 3) % 3) as f32 - 1.0).collect();
        for dtype in [DType::I2S, DType::TQ2_0] {
            let bytes = quant::quantize(dtype, &values);
            let w = WeightView { dtype, shape: vec![n, k], data: &bytes };
            for rows in TernaryTiles::ROWS {
                let fast = PackedTernary::from_weight(&w, rows).unwrap();
                let slow = PackedTernary::from_blocks(&w, rows).unwrap();
                assert_eq!((&*fast.data, fast.scale), (&*slow.data, slow.scale), "{dtype} rows {rows}");
            }
        }
    }

    /// I2_S rows padded to whole blocks (bitnet_b1_58-3B's FFN, from an HF
    /// folder) repack byte for byte like any other row, on awkward lengths.
    #[test]
    fn padded_i2s_rows_repack_like_the_generic_path() {
        for (n, k) in [(5, 1), (3, 3), (5, 783), (2, 2592 + 32), (3, 8640)] {
            let codes: Vec<i8> = (0..n * k).map(|i| ((i * 7 + i / 3) % 3) as i8 - 1).collect();
            let bytes = quant::pack_i2s_rows(&codes, k, 0.25);
            let w = WeightView { dtype: DType::I2S, shape: vec![n, k], data: &bytes };
            for rows in TernaryTiles::ROWS {
                let fast = PackedTernary::from_weight(&w, rows).unwrap();
                let slow = PackedTernary::from_blocks(&w, rows).unwrap();
                assert_eq!((fast.k, fast.kp), (k, Packing::Bits2.padded(k)), "k {k}");
                assert_eq!((&*fast.data, fast.scale), (&*slow.data, slow.scale), "k {k} rows {rows}");
            }
        }
    }
}
