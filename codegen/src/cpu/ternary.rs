//! Ternary matrix products over int8 activations: the packed weight
//! layout, a scalar reference kernel, and native AVX2 micro-kernels.
//!
//! Layout. Each weight is stored as its code `value + 1` (0, 1 or 2) in
//! two bits. A row of `k` weights is padded with zeros to `kp`, a multiple
//! of 128, and cut into chunks of 128 weights in 32 bytes: byte `j` of a
//! chunk holds weights `j`, `j + 32`, `j + 64`, `j + 96` in bits 7:6, 5:4,
//! 3:2 and 1:0 (bitnet.cpp's I2_S order, so one shift and one mask give 32
//! consecutive codes). Rows go in tiles of `rows`: for each chunk, the
//! tile's rows follow each other, so a multi-row kernel reads one stream.
//!
//! Arithmetic. With codes `c = w + 1`, `Σ w·x = Σ c·x − Σ x`: the kernels
//! multiply unsigned codes by signed activations (`pmaddubsw`) and subtract
//! each token's `Σ x` once. The result, `((dot as f32) · β) / γ`, then the
//! epilogue, is the interpreter's arithmetic for one scale per tensor.

use super::blob::Blob;
use super::pool::{share, Chunks, Pool, SharedMut};
use super::{vmath, Isa};
use bitnet_ir::interp::WeightView;
use bitnet_ir::DType;
use bitnet_ir::GateAct;

/// Weights per chunk, and its bytes.
pub const CHUNK: usize = 128;
pub(crate) const CHUNK_BYTES: usize = 32;

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

    pub fn is_valid(&self) -> bool {
        Self::ROWS.contains(&self.rows) && Self::TOKENS.contains(&self.tokens) && self.isa.available()
    }
}

impl std::fmt::Display for TernaryTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "isa={} rows={} tokens={} split={}", self.isa.name(), self.rows, self.tokens, self.split.name())
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
    /// β: the one weight scale.
    pub scale: f32,
    data: Blob<u8>,
}

impl PackedTernary {
    /// Packs rows given as values −1, 0, 1, `codes(r, out)` filling row `r`.
    pub fn from_rows(n: usize, k: usize, rows: usize, scale: f32, mut codes: impl FnMut(usize, &mut [i8])) -> PackedTernary {
        let mut values = vec![0i8; k];
        PackedTernary::from_chunks(n, k, rows, scale, |r, out| {
            values.fill(0);
            codes(r, &mut values);
            for (c, chunk) in out.chunks_exact_mut(CHUNK_BYTES).enumerate() {
                let code = |i: usize| values.get(c * CHUNK + i).map_or(1, |&v| (v + 1) as u8);
                for (j, byte) in chunk.iter_mut().enumerate() {
                    *byte = code(j) << 6 | code(j + 32) << 4 | code(j + 64) << 2 | code(j + 96);
                }
            }
        })
    }

    /// Packs rows given already in the chunk layout: `fill(r, out)` writes
    /// row `r`'s `kp / 4` bytes.
    fn from_chunks(n: usize, k: usize, rows: usize, scale: f32, mut fill: impl FnMut(usize, &mut [u8])) -> PackedTernary {
        let kp = k.div_ceil(CHUNK) * CHUNK;
        let chunks = kp / CHUNK;
        // Padding (rows past n, weights past k) holds code 1, the value 0.
        let mut data = vec![0x55u8; n.div_ceil(rows) * rows * chunks * CHUNK_BYTES];
        let mut row = vec![0x55u8; kp / 4];
        for r in 0..n {
            fill(r, &mut row);
            let (tile, in_tile) = (r / rows, r % rows);
            for (c, chunk) in row.chunks_exact(CHUNK_BYTES).enumerate() {
                let at = ((tile * chunks + c) * rows + in_tile) * CHUNK_BYTES;
                data[at..at + CHUNK_BYTES].copy_from_slice(chunk);
            }
        }
        PackedTernary { n, k, kp, rows, scale, data: data.into() }
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
        PackedTernary::from_chunks(w.rows(), w.row_len(), rows, scale, |r, out| {
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
        let packed = PackedTernary::from_chunks(w.rows(), w.row_len(), rows, 0.0, |r, out| {
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
    pub fn from_parts(n: usize, k: usize, rows: usize, scale: f32, data: Blob<u8>) -> Result<PackedTernary, String> {
        if !TernaryTiles::ROWS.contains(&rows) || n == 0 || k == 0 {
            return Err(format!("packed ternary [{n}, {k}] with {rows} rows per tile is not a layout the kernels know"));
        }
        let kp = k.div_ceil(CHUNK) * CHUNK;
        let want = n.div_ceil(rows) * rows * (kp / CHUNK) * CHUNK_BYTES;
        if data.len() != want {
            return Err(format!("packed ternary [{n}, {k}] needs {want} bytes, got {}", data.len()));
        }
        Ok(PackedTernary { n, k, kp, rows, scale, data })
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The packed bytes, tile after tile.
    pub fn data(&self) -> &Blob<u8> {
        &self.data
    }

    fn chunks(&self) -> usize {
        self.kp / CHUNK
    }

    fn tile(&self, t: usize) -> &[u8] {
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
    pub q: Vec<i8>,
    pub gamma: Vec<f32>,
    pub sum: Vec<i32>,
}

impl QuantActs {
    pub fn tokens(&self) -> usize {
        self.gamma.len()
    }
    /// Sizes the buffers for `s` tokens of `k` values.
    pub fn resize(&mut self, s: usize, k: usize) {
        self.k = k;
        self.kp = k.div_ceil(CHUNK) * CHUNK;
        self.q.clear();
        self.q.resize(s * self.kp, 0);
        self.gamma.resize(s, 0.0);
        self.sum.resize(s, 0);
    }
    pub fn row(&self, t: usize) -> &[i8] {
        &self.q[t * self.kp..(t + 1) * self.kp]
    }
    /// The rows of tokens `tok..tok + step` as the tile kernels read them:
    /// four pointers, the last row repeated past `step`.
    pub(super) fn step_rows(&self, tok: usize, step: usize) -> [*const i8; 4] {
        std::array::from_fn(|j| self.row(tok + j.min(step - 1)).as_ptr())
    }
}

/// How far ahead of its loads a native tile kernel prefetches weights, in
/// bytes: the hardware prefetcher alone leaves the loads waiting on DRAM.
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 1024;

/// Prefetches the weights [`PREFETCH`] bytes past chunk `c` of a tile of
/// `rows` rows (two cache lines for tiles of more than two rows).
///
/// # Safety
/// `w` points into the tile; a prefetch past its end is harmless.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn prefetch_ahead(w: *const u8, c: usize, rows: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let at = w.wrapping_add(c * rows * CHUNK_BYTES + PREFETCH) as *const i8;
    _mm_prefetch::<_MM_HINT_T0>(at);
    if rows > 2 {
        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64));
    }
}

/// What happens to each result: `((dot · β) / γ) · scale + residual`.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub scale: Option<f32>,
    /// `[tokens, n]`, added last.
    pub residual: Option<&'a [f32]>,
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

/// The epilogue of one token `t`'s results for the rows `n..n + 4` of a
/// tile (`dots[r]` for row `n + r`; rows past the matrix are computed and
/// dropped). Four lanes at a time, so that the compiler keeps them in one
/// vector (a scalar loop waited on each division in turn); each lane is
/// the interpreter's arithmetic, IEEE division included.
#[inline(always)]
fn finish(dots: [i32; 4], x: &QuantActs, t: usize, w: &PackedTernary, ep: &Epilogue, n: usize) -> [f32; 4] {
    let (sum, gamma) = (x.sum[t], x.gamma[t]);
    let mut v = [0f32; 4];
    for r in 0..4 {
        v[r] = ((dots[r] - sum) as f32 * w.scale) / gamma;
    }
    if let Some(s) = ep.scale {
        for v in &mut v {
            *v *= s;
        }
    }
    if let Some(res) = ep.residual {
        let at = t * w.n + n;
        let add: [f32; 4] = match res.get(at..at + 4) {
            Some(four) if w.n - n >= 4 => four.try_into().expect("four values"),
            _ => std::array::from_fn(|r| if n + r < w.n { res[at + r] } else { 0.0 }),
        };
        for r in 0..4 {
            v[r] += add[r];
        }
    }
    v
}

/// `out[t, n] = epilogue(x[t] · w[n])` for all tokens and rows, split
/// over the pool's workers by row tiles or by tokens (`tiles.split`).
pub fn matmul(pool: &Pool, tiles: TernaryTiles, w: &PackedTernary, x: &QuantActs, out: &mut [f32], ep: Epilogue) {
    products(pool, tiles, &[[w]], x, out, |_, t, n, [dots], out| store(out, finish(dots, x, t, w, &ep, n)));
}

/// The products of one activation with several matrices (`(weight, s)`
/// each: q, k and v), their results side by side in each row of `out`:
/// [`matmul`] of each with scale `s`, as one pass handed out to the workers.
pub fn matmul_cat(pool: &Pool, tiles: TernaryTiles, parts: &[(&PackedTernary, Option<f32>)], x: &QuantActs, out: &mut [f32]) {
    let groups: Vec<[&PackedTernary; 1]> = parts.iter().map(|p| [p.0]).collect();
    let eps: Vec<Epilogue> = parts.iter().map(|p| Epilogue { scale: p.1, residual: None }).collect();
    products(pool, tiles, &groups, x, out, |g, t, n, [dots], out| store(out, finish(dots, x, t, parts[g].0, &eps[g], n)));
}

/// Writes a tile's four results, or those of its rows that exist: a
/// fixed-size store where all four do (a slice of run-time length would
/// be a call to `memcpy` per tile and token).
#[inline(always)]
fn store(out: &mut [f32], v: [f32; 4]) {
    match <&mut [f32; 4]>::try_from(&mut *out) {
        Ok(four) => *four = v,
        Err(_) => out.copy_from_slice(&v[..out.len()]),
    }
}

/// `out[t, n] = act(x[t] · gate[n] · β_g · s_g) · (x[t] · up[n] · β_u · s_u)`:
/// the gate and up products of a gated unit in one pass over the
/// activations, `(weight, s)` each, with the unit applied as each tile's
/// results leave the registers. The same arithmetic as [`matmul`] twice and
/// then `glu`.
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
    products(pool, tiles, &[[wg, wu]], x, out, |_, t, n, [g, u], out| {
        store(out, vmath::glu4(tiles.isa, act, finish(g, x, t, wg, &eg, n), finish(u, x, t, wu, &eu, n)));
    });
}

/// The loop shared by the products: every row tile of each group of `M`
/// matrices (same shape within a group, one layout for all) against every
/// token, split over the workers. Each group's results take the next
/// columns of `out`'s rows. `write(group, t, n, dots, out)` turns token
/// `t`'s dots for rows `n..n + 4` of the group's matrices into `out`, its
/// results for the rows that exist.
fn products<const M: usize>(
    pool: &Pool,
    tiles: TernaryTiles,
    groups: &[[&PackedTernary; M]],
    x: &QuantActs,
    out: &mut [f32],
    write: impl Fn(usize, usize, usize, [[i32; 4]; M], &mut [f32]) + Sync,
) {
    let w = groups[0][0];
    let same = groups.iter().all(|g| g.iter().all(|v| v.n == g[0].n && v.rows == w.rows && v.kp == w.kp));
    // Per group: its first tile and its first column.
    let mut first = vec![(0usize, 0usize)];
    for g in groups {
        let &(t, c) = first.last().unwrap();
        first.push((t + g[0].n.div_ceil(w.rows), c + g[0].n));
    }
    let (n_tiles, width) = *first.last().unwrap();
    assert!(same && tiles.rows == w.rows && x.kp == w.kp && out.len() == x.tokens() * width, "ternary matmul: mismatched operands");
    assert!(tiles.isa.available(), "ternary matmul: {} is not available on this CPU", tiles.isa.name());
    let dst = SharedMut(out.as_mut_ptr());
    let by_tokens = tiles.split == Split::Tokens && x.tokens() >= pool.threads();
    let chunks = Chunks::new(n_tiles, pool.threads());
    pool.run_sized(x.tokens() * width * w.kp * M, &|me, workers| {
        let mut dots = [[[0i32; 4]; 4]; M];
        let mut codes: [Vec<u8>; M] = std::array::from_fn(|_| Vec::new());
        // A tile's dots for all its tokens: the epilogues then run back to
        // back, their divisions overlapping, instead of each waiting
        // between two kernel calls.
        let mut held: Vec<[[i32; 4]; M]> = Vec::new();
        let mut tile = |global: usize, tokens: std::ops::Range<usize>| {
            let g = first.partition_point(|f| f.0 <= global) - 1;
            let (ws, t) = (&groups[g], global - first[g].0);
            let unpack = tiles.tokens > 1 && tokens.len() >= tiles.tokens;
            let unpacked: [bool; M] = std::array::from_fn(|m| unpack && unpack_tile(tiles.isa, ws[m], t, &mut codes[m]));
            let n = t * w.rows;
            let len = w.rows.min(ws[0].n - n);
            held.resize(tokens.len(), [[0; 4]; M]);
            let mut tok = tokens.start;
            while tok < tokens.end {
                let step = if tokens.end - tok >= tiles.tokens { tiles.tokens } else { 1 };
                for m in 0..M {
                    tile_dots(tiles.isa, ws[m], t, unpacked[m].then_some(&codes[m][..]), x, tok, step, &mut dots[m]);
                }
                // Plain loops: `array::map` here was a call (`try_map`) per token.
                for (j, h) in held[tok - tokens.start..][..step].iter_mut().enumerate() {
                    for (hm, dm) in h.iter_mut().zip(&dots) {
                        for (r, v) in hm.iter_mut().enumerate() {
                            *v = dm[r][j];
                        }
                    }
                }
                tok += step;
            }
            for (tok, &d) in tokens.zip(&held) {
                // SAFETY: each (token, row) pair belongs to one worker alone.
                let out = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(tok * width + first[g].1 + n), len) };
                write(g, tok, n, d, out);
            }
        };
        if by_tokens {
            let tokens = share(x.tokens(), me, workers);
            (0..n_tiles).for_each(|t| tile(t, tokens.clone()));
        } else {
            while let Some(range) = chunks.next() {
                range.for_each(|t| tile(t, 0..x.tokens()));
            }
        }
    });
}

/// Prefill on AVX2 first unpacks a tile's codes to one byte each
/// ([`avx2::unpack`]), once for all its tokens, so that the inner loop is
/// only multiplies and adds. `false` where the ISA reads packed codes.
fn unpack_tile(isa: Isa, w: &PackedTernary, t: usize, codes: &mut Vec<u8>) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            avx2::unpack(w.rows, w.tile(t), w.chunks(), codes);
            true
        }
        _ => false,
    }
}

/// The code-times-activation sums of tile `t` against tokens `tok..tok+step`,
/// from the tile's `codes` when [`unpack_tile`] made them.
#[allow(clippy::too_many_arguments)]
fn tile_dots(isa: Isa, w: &PackedTernary, t: usize, codes: Option<&[u8]>, x: &QuantActs, tok: usize, step: usize, dots: &mut [[i32; 4]; 4]) {
    match isa {
        Isa::Scalar => reference_dots(w, t, x, tok, step, dots),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => match codes {
            Some(codes) if step > 1 => avx2::unpacked_dots(w.rows, step, codes, w.chunks(), x, tok, dots),
            _ => avx2::dots(w.rows, step, w.tile(t), w.chunks(), x, tok, dots),
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => super::vnni::dots(w.rows, step, w.tile(t), w.chunks(), x, tok, dots),
        Isa::Cranelift => jit_dots(w, t, x, tok, step, dots),
        #[allow(unreachable_patterns)]
        _ => unreachable!("checked by matmul"),
    }
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
                    for i in 0..4 {
                        let code = (byte >> (6 - 2 * i)) & 3;
                        dot += code as i32 * xs[c * CHUNK + 32 * i + b] as i32;
                    }
                }
            }
            *out = dot;
        }
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
    use super::{QuantActs, CHUNK, CHUNK_BYTES};
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

    /// Writes a tile's codes one per byte: for each chunk, its four code
    /// groups (bits 7:6, 5:4, 3:2, 1:0 of the packed bytes) in turn, each
    /// group's rows one after the other, 32 bytes each.
    pub(super) fn unpack(rows: usize, tile: &[u8], chunks: usize, codes: &mut Vec<u8>) {
        assert_eq!(tile.len(), chunks * rows * CHUNK_BYTES);
        codes.resize(4 * tile.len(), 0);
        // SAFETY: `matmul` checked that AVX2 is present; both lengths are set above.
        unsafe { unpack_avx2(rows, tile, chunks, codes) }
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

    /// Prefill from unpacked codes (see [`unpack`]).
    pub(super) fn unpacked_dots(rows: usize, step: usize, codes: &[u8], chunks: usize, x: &QuantActs, tok: usize, out: &mut [[i32; 4]; 4]) {
        assert!(codes.len() == chunks * 4 * rows * CHUNK_BYTES && x.kp >= chunks * CHUNK && tok + step <= x.tokens());
        let xs = x.step_rows(tok, step);
        // SAFETY: `matmul` checked that AVX2 is present; lengths are checked above.
        unsafe {
            match (rows, step) {
                (1, 2) => gemm::<1, 1, 2>(codes, 0, chunks, &xs, out),
                (1, 4) => gemm::<1, 1, 4>(codes, 0, chunks, &xs, out),
                (2, 2) => gemm::<2, 2, 2>(codes, 0, chunks, &xs, out),
                (2, 4) => gemm::<2, 2, 4>(codes, 0, chunks, &xs, out),
                (4, 2) => gemm::<4, 4, 2>(codes, 0, chunks, &xs, out),
                (4, 4) => {
                    // Sixteen accumulators would not fit in 16 registers:
                    // two passes of two rows, the second with the
                    // activations in L1 still.
                    gemm::<4, 2, 4>(codes, 0, chunks, &xs, out);
                    gemm::<4, 2, 4>(codes, 2, chunks, &xs, out);
                }
                _ => unreachable!("tiles are validated; one token reads packed codes"),
            }
        }
    }

    /// Chunks whose 16-bit sums may add up before they could overflow: one
    /// chunk adds between 4 · 2 · 2 · (−128) = −2048 and 2032 to a lane,
    /// 16 of them between −32768 and 32512, which i16 holds.
    const I16_CHUNKS: usize = 16;

    /// Rows `r0..r0 + RS` of a tile of `RL` rows, against `T` tokens, from
    /// unpacked codes. Written for the 16 registers: `RS · T` ≤ 8 16-bit
    /// accumulators, `RS` code vectors and one activation vector live, so
    /// nothing spills and each 32 products cost one `pmaddubsw` and one
    /// add. Sums widen to 32 bits (`pmaddwd`) every [`I16_CHUNKS`] chunks.
    #[target_feature(enable = "avx2")]
    unsafe fn gemm<const RL: usize, const RS: usize, const T: usize>(codes: &[u8], r0: usize, chunks: usize, xs: &[*const i8; 4], out: &mut [[i32; 4]; 4]) {
        let ones = _mm256_set1_epi16(1);
        let mut wide = [[_mm256_setzero_si256(); T]; RS];
        let w = codes.as_ptr().add(r0 * CHUNK_BYTES);
        let mut c0 = 0;
        while c0 < chunks {
            let c1 = (c0 + I16_CHUNKS).min(chunks);
            let mut acc = [[_mm256_setzero_si256(); T]; RS];
            for g in c0 * 4..c1 * 4 {
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
            c0 = c1;
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
}
