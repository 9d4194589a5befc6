//! Ternary products of many tokens on AMX tiles (Intel Sapphire Rapids and
//! later). One `tdpbusd` multiplies a 16 × 64 tile of unsigned bytes by a
//! 64 × 16 tile of signed ones into 16 × 16 sums: 16384 products, where
//! AVX-512's `vpdpbusd` does 64. A prefill of many tokens keeps the VNNI
//! kernels at the rate of `vpdpbusd`; on tiles the weights' unpacking and
//! the tiles' loads decide instead.
//!
//! The layout: tile A holds 16 weight rows' codes (0, 1, 2: one byte each)
//! for 64 consecutive weights, tile B 16 tokens' activations for the same
//! 64 weights, each four side by side ([`Acts`], arranged once a call). A
//! call unpacks 64 rows from the 2-bit layout of [`super::ternary`] (or the
//! 1.6-bit one, through its own unpacking: [`fits`]), four groups of 16,
//! once for all tokens; each B tile then meets the four
//! groups' A tiles, four chains of `tdpbusd` into four C tiles. The sums are of codes
//! times activations, as every ternary kernel's are (the caller subtracts
//! `Σx`), and integer: the same values as the VNNI kernels', so the
//! epilogue's results are the same bits.
//!
//! Linux hands a process the tile registers only when asked
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); [`available`] asks once. Each
//! worker loads the tile configuration when it starts a share of a product
//! and releases the tiles when done, returning them to their initial state.

use super::ternary::{PackedTernary, Packing, QuantActs, CHUNK, CHUNK_BYTES};
use std::arch::asm;
use std::arch::x86_64::*;

/// Weight rows in one A tile.
const ROWS: usize = 16;
/// Tokens in one B tile's columns.
const TOKENS: usize = 16;
/// Bytes of a tile row: 64 codes of A, or four activations of each of B's 16 tokens.
const ROW_BYTES: usize = 64;
/// The fewest tokens a product goes to tiles with: [`super::AMX_MIN_TOKENS`].
pub(super) const MIN_TOKENS: usize = super::AMX_MIN_TOKENS;

/// Whether `w`'s rows are whole pairs of A tiles' 64 weights (the tiles
/// take two weight blocks a step): always in 2 bits (128 a chunk), and in
/// 1.6 bits where the chunks of a row are a multiple of four (640
/// weights; 2560 is, and 6912, padded to 7040).
pub(super) fn fits(w: &PackedTernary) -> bool {
    w.kp.is_multiple_of(2 * ROW_BYTES)
}

/// Whether this CPU has AMX-INT8 and the kernel lets this process use it.
pub(super) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        // CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8 (the
        // standard library's detection of them is not stable yet).
        let edx = __cpuid_count(7, 0).edx;
        if edx & (3 << 24) != 3 << 24 || !is_x86_feature_detected!("avx512bw") {
            return false;
        }
        #[cfg(target_os = "linux")]
        {
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a request for a permission; no memory is passed.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        }
        #[cfg(not(target_os = "linux"))]
        false
    })
}

/// A call's activations as B tiles: for token block `b` (16 tokens) and
/// weight block `h` (64 weights), 16 rows of 64 bytes, row `i` holding
/// activations `64h + 4i .. 64h + 4i + 4` of each token in turn (zeros for
/// tokens past the last).
pub(super) struct Acts {
    tokens: usize,
    blocks: usize,
    weight_blocks: usize,
    /// Four activations (one token's, in order) a lane.
    data: Vec<u32>,
}

impl Acts {
    /// `x`'s tokens for products of `kp` weights a row.
    pub(super) fn new(x: &QuantActs, kp: usize) -> Acts {
        let (blocks, weight_blocks) = (x.tokens().div_ceil(TOKENS), kp / ROW_BYTES);
        let mut data = vec![0u32; blocks * weight_blocks * ROWS * TOKENS];
        for t in 0..x.tokens() {
            let (b, n) = (t / TOKENS, t % TOKENS);
            for (h, acts) in x.row(t)[..kp].chunks_exact(ROW_BYTES).enumerate() {
                let tile = &mut data[(b * weight_blocks + h) * ROWS * TOKENS..][..ROWS * TOKENS];
                for (i, four) in acts.chunks_exact(4).enumerate() {
                    tile[i * TOKENS + n] = u32::from_le_bytes([four[0] as u8, four[1] as u8, four[2] as u8, four[3] as u8]);
                }
            }
        }
        Acts { tokens: x.tokens(), blocks, weight_blocks, data }
    }

    fn tile(&self, b: usize, h: usize) -> *const u8 {
        self.data[(b * self.weight_blocks + h) * ROWS * TOKENS..][..ROWS * TOKENS].as_ptr() as *const u8
    }
}

/// Bytes of one tile: 16 rows of 64.
const TILE_BYTES: usize = ROWS * ROW_BYTES;

/// A tiles' row groups a call multiplies: four C tiles, four chains of
/// `tdpbusd` in flight, each B tile loaded once for all four.
const GROUPS: usize = 4;
/// The weight rows of one call.
pub(super) const CALL_ROWS: usize = GROUPS * ROWS;

/// The tile configuration (palette 1): C tiles 0-3 (one per row group), A
/// tiles 4 and 5 and B tiles 6 and 7 (each loaded in turn, so that a load
/// need not wait for the `tdpbusd` reading the other); each 16 rows of 64
/// bytes.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: Config = {
    let mut c = Config { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
    let mut i = 0;
    while i < 8 {
        c.colsb[i] = ROW_BYTES as u16;
        c.rows[i] = ROWS as u8;
        i += 1;
    }
    c
};

/// One worker's tiles and scratch for a product: configured when made,
/// released when dropped, on one thread (the tile configuration is the
/// thread's: a worker is not `Send`). One at a time a thread: dropping one
/// releases the tiles of all.
pub(super) struct Worker {
    weight_blocks: usize,
    on_this_thread: std::marker::PhantomData<*const ()>,
    /// 64 rows' codes as A tiles: group `g`'s weight block `h` (16 rows of
    /// 64 codes) at `(g · weight_blocks + h) · 1024`.
    codes: Vec<u8>,
    /// A 1.6-bit tile's codes row after row, before they go to `codes`.
    row_codes: super::lines::LineVec<u8>,
    /// One token block's sums, `[16 rows][16 tokens]` for each group.
    sums: [[i32; ROWS * TOKENS]; GROUPS],
}

impl Worker {
    /// # Panics
    /// Where [`available`] is false: the caller checks it first.
    pub(super) fn new(kp: usize) -> Worker {
        assert!(available(), "amx: this CPU or OS has no AMX-INT8");
        // SAFETY: AMX is available and the process has the permission; the
        // configuration is a valid palette-1 one (checked by the CPU, which
        // faults on an invalid one rather than misbehaving).
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const Config, options(nostack, readonly)) };
        let weight_blocks = kp / ROW_BYTES;
        Worker {
            weight_blocks,
            on_this_thread: std::marker::PhantomData,
            codes: vec![0; GROUPS * weight_blocks * TILE_BYTES],
            row_codes: super::lines::LineVec::new(),
            sums: [[0; ROWS * TOKENS]; GROUPS],
        }
    }

    /// `out[r · s + t]` = row `r` of the tiles `tiles` of `w` (at most 64
    /// rows) · token `t`, for each of `x`'s `s` tokens. Rows past the tiles'
    /// are multiplied too, with whatever codes the scratch holds, and dropped.
    /// The rows are unpacked whole first, then multiplied by each block of
    /// 16 tokens in turn.
    pub(super) fn dots(&mut self, w: &PackedTernary, tiles: std::ops::Range<usize>, x: &Acts, out: &mut [i32]) {
        let (rows, s, blocks, chunks) = (tiles.len() * w.rows, x.tokens, self.weight_blocks, w.kp / CHUNK);
        assert!(
            rows <= CALL_ROWS && ROWS.is_multiple_of(w.rows) && fits(w) && x.weight_blocks == blocks && blocks * ROW_BYTES == w.kp && out.len() >= rows * s,
            "amx dots: mismatched operands"
        );
        for (q, t) in tiles.enumerate() {
            let first = q * w.rows;
            let group = &mut self.codes[first / ROWS * blocks * TILE_BYTES..][..blocks * TILE_BYTES];
            match w.packing {
                // SAFETY: the CPU has AVX-512 F and BW (part of AMX's CPUs
                // and of Isa::Avx512Vnni, checked by the caller); `unpack`
                // checks the lengths.
                Packing::Bits2 => unsafe { unpack(w.tile(t), w.rows, chunks, group, first % ROWS) },
                Packing::Base3 => {
                    super::ternary::unpack_base3(w, t, &mut self.row_codes);
                    place(&self.row_codes, w.kp, group, first % ROWS);
                }
            }
        }
        for b in 0..x.blocks {
            self.zero();
            for h in (0..blocks).step_by(2) {
                // SAFETY: `codes` holds every block of each group.
                unsafe { self.accumulate(h, x, b) };
            }
            self.store(rows, s, b, out);
        }
    }

    /// Adds weight blocks `h, h + 1` of each group's codes times token
    /// block `b`'s activations of the same weights to the C tiles.
    ///
    /// # Safety
    /// The tiles were configured by [`Worker::new`] on this thread (a
    /// worker lives inside one pool job); `codes` holds blocks `h, h + 1`
    /// of all four groups.
    unsafe fn accumulate(&self, h: usize, x: &Acts, b: usize) {
        let a = |g: usize| self.codes[(g * self.weight_blocks + h) * TILE_BYTES..][..2 * TILE_BYTES].as_ptr();
        asm!(
            "tileloadd tmm6, [{b0} + {stride}*1]",
            "tileloadd tmm4, [{a0} + {stride}*1]",
            "tdpbusd tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a1} + {stride}*1]",
            "tdpbusd tmm1, tmm5, tmm6",
            "tileloadd tmm4, [{a2} + {stride}*1]",
            "tdpbusd tmm2, tmm4, tmm6",
            "tileloadd tmm5, [{a3} + {stride}*1]",
            "tdpbusd tmm3, tmm5, tmm6",
            "tileloadd tmm7, [{b1} + {stride}*1]",
            "tileloadd tmm4, [{a0} + {stride}*1 + {next}]",
            "tdpbusd tmm0, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {stride}*1 + {next}]",
            "tdpbusd tmm1, tmm5, tmm7",
            "tileloadd tmm4, [{a2} + {stride}*1 + {next}]",
            "tdpbusd tmm2, tmm4, tmm7",
            "tileloadd tmm5, [{a3} + {stride}*1 + {next}]",
            "tdpbusd tmm3, tmm5, tmm7",
            b0 = in(reg) x.tile(b, h),
            b1 = in(reg) x.tile(b, h + 1),
            a0 = in(reg) a(0),
            a1 = in(reg) a(1),
            a2 = in(reg) a(2),
            a3 = in(reg) a(3),
            stride = in(reg) ROW_BYTES,
            next = const TILE_BYTES,
            options(nostack, readonly),
        );
    }

    /// Clears the C tiles.
    fn zero(&mut self) {
        // SAFETY: `new` configured the tiles on this thread.
        unsafe { asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem)) };
    }

    /// Token block `b`'s sums from the C tiles into `out` (`rows` rows of
    /// `s` tokens).
    fn store(&mut self, rows: usize, s: usize, b: usize, out: &mut [i32]) {
        // SAFETY: the tiles were configured by `new` on this thread; each
        // store writes 16 rows of 64 bytes into its `sums`.
        unsafe {
            asm!(
                "tilestored [{c0} + {stride}*1], tmm0",
                "tilestored [{c1} + {stride}*1], tmm1",
                "tilestored [{c2} + {stride}*1], tmm2",
                "tilestored [{c3} + {stride}*1], tmm3",
                c0 = in(reg) self.sums[0].as_mut_ptr(),
                c1 = in(reg) self.sums[1].as_mut_ptr(),
                c2 = in(reg) self.sums[2].as_mut_ptr(),
                c3 = in(reg) self.sums[3].as_mut_ptr(),
                stride = in(reg) ROW_BYTES,
                options(nostack),
            );
        }
        let tokens = TOKENS.min(s - b * TOKENS);
        for r in 0..rows {
            let sums = &self.sums[r / ROWS][r % ROWS * TOKENS..][..TOKENS];
            out[r * s + b * TOKENS..][..tokens].copy_from_slice(&sums[..tokens]);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: this thread configured the tiles in `new`; releasing them
        // returns its tile state to the initial one.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// A tile's codes already one byte each, row after row (`kp` a row), into
/// a group's A tiles as rows `first..`: each row's block `h` of 64 codes
/// goes to row `first + r` of block `h`'s tile.
fn place(row_codes: &[u8], kp: usize, codes: &mut [u8], first: usize) {
    for (r, row) in row_codes.chunks_exact(kp).enumerate() {
        for (h, block) in row.chunks_exact(ROW_BYTES).enumerate() {
            codes[h * TILE_BYTES + (first + r) * ROW_BYTES..][..ROW_BYTES].copy_from_slice(block);
        }
    }
}

/// A tile's 2-bit codes (`rows` rows of `chunks` chunks), one byte each,
/// into a group's A tiles (`codes`: block `h`'s 16 rows of 64 at
/// `h · 1024`) as rows `first..first + rows`: each chunk's 32 bytes go into
/// both halves of a register, shifted by 6 and 4 (weights 0–63, block
/// `2c`) and by 2 and 0 (weights 64–127, block `2c + 1`), as
/// [`super::vnni`]'s shifting kernel takes them.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack(tile: &[u8], rows: usize, chunks: usize, codes: &mut [u8], first: usize) {
    assert!(tile.len() == rows * chunks * CHUNK_BYTES && first + rows <= ROWS && codes.len() >= chunks * 2 * TILE_BYTES);
    let mask = _mm512_set1_epi8(3);
    let low_fields = _mm512_inserti64x4::<1>(_mm512_set1_epi16(6), _mm256_set1_epi16(4));
    let high_fields = _mm512_inserti64x4::<1>(_mm512_set1_epi16(2), _mm256_set1_epi16(0));
    let (src, dst) = (tile.as_ptr(), codes.as_mut_ptr());
    for c in 0..chunks {
        super::ternary::prefetch_ahead(src, c, rows);
        for r in 0..rows {
            let packed = _mm512_broadcast_i64x4(_mm256_loadu_si256(src.add((c * rows + r) * CHUNK_BYTES) as *const __m256i));
            let at = dst.add(2 * c * TILE_BYTES + (first + r) * ROW_BYTES);
            _mm512_storeu_si512(at as *mut __m512i, _mm512_and_si512(_mm512_srlv_epi16(packed, low_fields), mask));
            _mm512_storeu_si512(at.add(TILE_BYTES) as *mut __m512i, _mm512_and_si512(_mm512_srlv_epi16(packed, high_fields), mask));
        }
    }
}
