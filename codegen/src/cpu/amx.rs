//! Ternary products of many tokens on AMX tiles (Intel Sapphire Rapids and
//! later). One `tdpbusd` multiplies a 16 × 64 tile of unsigned bytes by a
//! 64 × 16 tile of signed ones into 16 × 16 sums: 16384 products, where
//! AVX-512's `vpdpbusd` does 64. A batch of decode steps (many sequences)
//! or a prefill keeps the VNNI kernels at one `vpdpbusd` a cycle; on tiles
//! the weights' unpacking and reading decide instead.
//!
//! The layout: tile A holds 16 weight rows' codes (0, 1, 2: one byte each,
//! unpacked from the 2-bit layout of [`super::ternary`] into a scratch of
//! 16 rows × `kp` bytes, once for all tokens) for 64 consecutive weights;
//! tile B holds 16 tokens' activations for the same 64 weights, each four
//! side by side ([`Acts`], arranged once a call). The sums are of codes
//! times activations, as every ternary kernel's are (the caller subtracts
//! `Σx`), and integer: the same values as the VNNI kernels', so the
//! epilogue's results are the same bits.
//!
//! Linux hands a process the tile registers only when asked
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); [`available`] asks once. Each
//! worker loads the tile configuration when it starts a share of a product
//! and releases the tiles when done, so that threads that are not using
//! them save no tile state.

use super::ternary::{PackedTernary, QuantActs, CHUNK, CHUNK_BYTES};
use std::arch::asm;
use std::arch::x86_64::*;

/// Weight rows in one A tile: the rows a call multiplies at once.
pub(super) const ROWS: usize = 16;
/// Tokens in one B tile's columns.
pub(super) const TOKENS: usize = 16;
/// Bytes of a tile row: 64 codes of A, or four activations of each of B's 16 tokens.
const ROW_BYTES: usize = 64;
/// The fewest tokens a product goes to tiles with. On the 2-core Intel
/// Xeon VM of docs/performance.md (session of 2026-12-06, fourteenth) a
/// prefill of 256 tokens ran 1.2-1.4× and one of 128 1.5× faster on tiles,
/// one of 64 within the noise, and fewer tokens (8 sequences' decode steps
/// among them) slower: each call unpacks its 16 rows for all tokens, and a
/// `tdpbusd` there took 35-60 ns, not the 16 cycles a bare CPU's takes.
pub(super) const MIN_TOKENS: usize = 128;

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
    data: Vec<u8>,
}

impl Acts {
    /// `x`'s tokens for products of `kp` weights a row.
    pub(super) fn new(x: &QuantActs, kp: usize) -> Acts {
        let (blocks, weight_blocks) = (x.tokens().div_ceil(TOKENS), kp / ROW_BYTES);
        let mut data = vec![0u8; blocks * weight_blocks * ROWS * ROW_BYTES];
        for t in 0..x.tokens() {
            let (b, n) = (t / TOKENS, t % TOKENS);
            for (i, four) in x.row(t)[..kp].chunks_exact(4).enumerate() {
                let (h, row) = (i / ROWS, i % ROWS);
                let at = ((b * weight_blocks + h) * ROWS + row) * ROW_BYTES + 4 * n;
                for (d, &v) in data[at..at + 4].iter_mut().zip(four) {
                    *d = v as u8;
                }
            }
        }
        Acts { tokens: x.tokens(), blocks, weight_blocks, data }
    }

    fn tile(&self, b: usize, h: usize) -> *const u8 {
        self.data[(b * self.weight_blocks + h) * ROWS * ROW_BYTES..].as_ptr()
    }
}

/// The tile configuration (palette 1): C tiles 0 and 1 (the sums of even
/// and odd weight blocks, two chains that overlap), A tiles 4 and 5, B
/// tiles 6 and 7; each 16 rows of 64 bytes.
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
    let used = [0, 1, 4, 5, 6, 7];
    let mut i = 0;
    while i < used.len() {
        c.colsb[used[i]] = ROW_BYTES as u16;
        c.rows[used[i]] = ROWS as u8;
        i += 1;
    }
    c
};

/// One worker's tiles and scratch for a product: configured when made,
/// released when dropped.
pub(super) struct Worker {
    kp: usize,
    /// 16 rows' codes as A tiles: weight block `h`'s 16 rows of 64 codes
    /// at `h · 1024`, one after another.
    codes: Vec<u8>,
    /// The even and odd blocks' sums of one call, `[16 rows][16 tokens]` each.
    sums: [[i32; ROWS * TOKENS]; 2],
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
        Worker { kp, codes: vec![0; ROWS * kp], sums: [[0; ROWS * TOKENS]; 2] }
    }

    /// `out[r · s + t]` = row `r` of the tiles `tiles` of `w` (at most 16
    /// rows) · token `t`, for each of `x`'s `s` tokens.
    pub(super) fn dots(&mut self, w: &PackedTernary, tiles: std::ops::Range<usize>, x: &Acts, out: &mut [i32]) {
        let (rows, s) = (tiles.len() * w.rows, x.tokens);
        assert!(rows <= ROWS && w.kp == self.kp && x.weight_blocks * ROW_BYTES == w.kp && out.len() >= rows * s, "amx dots: mismatched operands");
        for (q, t) in tiles.enumerate() {
            // SAFETY: the CPU has AVX-512 F and BW (part of AMX's CPUs and
            // of Isa::Avx512Vnni, checked by the caller); the tile holds
            // `rows × chunks` chunks and the scratch `16 × kp` bytes.
            unsafe { unpack(w.tile(t), w.rows, w.kp / CHUNK, &mut self.codes, q * w.rows) };
        }
        for b in 0..x.blocks {
            // SAFETY: the tiles were configured by `new` on this thread
            // (a worker lives inside one pool job); each load reads 16 rows
            // of 64 bytes inside `codes` (stride kp) or `x` (stride 64), and
            // each store writes 16 × 64 bytes into `sums`.
            unsafe {
                asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
                for h in (0..x.weight_blocks).step_by(2) {
                    asm!(
                        "tileloadd tmm4, [{a0} + {kb}*1]",
                        "tileloadd tmm6, [{b0} + {kb}*1]",
                        "tdpbusd tmm0, tmm4, tmm6",
                        "tileloadd tmm5, [{a1} + {kb}*1]",
                        "tileloadd tmm7, [{b1} + {kb}*1]",
                        "tdpbusd tmm1, tmm5, tmm7",
                        a0 = in(reg) self.codes.as_ptr().add(h * ROWS * ROW_BYTES),
                        a1 = in(reg) self.codes.as_ptr().add((h + 1) * ROWS * ROW_BYTES),
                        b0 = in(reg) x.tile(b, h),
                        b1 = in(reg) x.tile(b, h + 1),
                        kb = in(reg) ROW_BYTES,
                        options(nostack, readonly),
                    );
                }
                asm!(
                    "tilestored [{c0} + {s}*1], tmm0",
                    "tilestored [{c1} + {s}*1], tmm1",
                    c0 = in(reg) self.sums[0].as_mut_ptr(),
                    c1 = in(reg) self.sums[1].as_mut_ptr(),
                    s = in(reg) ROW_BYTES,
                    options(nostack),
                );
            }
            for r in 0..rows {
                for n in 0..TOKENS.min(s - b * TOKENS) {
                    out[r * s + b * TOKENS + n] = self.sums[0][r * TOKENS + n] + self.sums[1][r * TOKENS + n];
                }
            }
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

/// A tile's 2-bit codes, `rows` rows of `chunks` chunks, one byte each
/// into `codes`' A tiles as rows `first..first + rows`: each chunk's 32
/// bytes go into both halves of a register, shifted by 6 and 4 (weights
/// 0–63, weight block `2c`) and by 2 and 0 (weights 64–127, block `2c + 1`),
/// as [`super::vnni`]'s shifting kernel takes them.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack(tile: &[u8], rows: usize, chunks: usize, codes: &mut [u8], first: usize) {
    assert!(tile.len() == rows * chunks * CHUNK_BYTES && first + rows <= ROWS && codes.len() >= chunks * 2 * ROWS * ROW_BYTES);
    let mask = _mm512_set1_epi8(3);
    let low_fields = _mm512_inserti64x4::<1>(_mm512_set1_epi16(6), _mm256_set1_epi16(4));
    let high_fields = _mm512_inserti64x4::<1>(_mm512_set1_epi16(2), _mm256_set1_epi16(0));
    let (src, dst) = (tile.as_ptr(), codes.as_mut_ptr());
    for c in 0..chunks {
        super::ternary::prefetch_ahead(src, c, rows);
        for r in 0..rows {
            let packed = _mm512_broadcast_i64x4(_mm256_loadu_si256(src.add((c * rows + r) * CHUNK_BYTES) as *const __m256i));
            let at = dst.add((2 * c * ROWS + first + r) * ROW_BYTES);
            _mm512_storeu_si512(at as *mut __m512i, _mm512_and_si512(_mm512_srlv_epi16(packed, low_fields), mask));
            _mm512_storeu_si512(at.add(ROWS * ROW_BYTES) as *mut __m512i, _mm512_and_si512(_mm512_srlv_epi16(packed, high_fields), mask));
        }
    }
}
