//! The interpreter's own `exp`, so that its results do not depend on the
//! platform's libm (glibc, musl and macOS round some `expf` results
//! differently) and so that the native kernels can compute the very same
//! function eight lanes at a time (`bitnet_codegen::cpu::vmath`).
//!
//! Cody–Waite range reduction `x = n·ln 2 + r`, |r| ≤ ln 2 / 2, Cephes'
//! degree-5 polynomial for `eʳ`, then two exact scalings by powers of two
//! (`2^⌊n/2⌋ · 2^(n−⌊n/2⌋)`, so that results near the ends of the range,
//! subnormal ones included, round once). Every step is one IEEE multiply
//! or add, never a fused one, in a fixed order: a vector version made of
//! the same steps gives the same bits. Error: within 2 ulp of the true
//! value wherever the result is normal (tested against f64).

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts: `n · LN2_HI` is exact for the `n` that occur.
pub const LN2_HI: f32 = 0.693_359_4;
pub const LN2_LO: f32 = -2.121_944_4e-4;
/// `eʳ ≈ 1 + r + r²·P(r)`, highest power first.
pub const POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
/// Inputs are clamped to this range: below it the result rounds to 0,
/// above it to +∞, and the scalings stay within the exponent range.
pub const CLAMP: (f32, f32) = (-104.0, 89.0);

/// `2ⁿ` for −126 ≤ n ≤ 127, from its bits.
#[inline(always)]
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// `eˣ`, as described in the module's notes. NaN gives NaN, −∞ gives 0,
/// +∞ gives +∞.
#[inline]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let x = x.clamp(CLAMP.0, CLAMP.1);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI;
    let r = r - n * LN2_LO;
    let mut p = POLY[0];
    for c in &POLY[1..] {
        p = p * r + c;
    }
    let y = p * (r * r) + r + 1.0;
    let n = n as i32;
    let half = n >> 1;
    y * pow2(half) * pow2(n - half)
}

#[cfg(test)]
mod tests {
    use super::exp;

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        let ulp = (f32::from_bits(b32.to_bits() + 1) - b32) as f64;
        (a as f64 - b).abs() / ulp
    }

    #[test]
    fn within_two_ulp_of_f64_wherever_normal() {
        let mut worst: f64 = 0.0;
        let mut x = -87.0f32;
        while x < 88.5 {
            let want = (x as f64).exp();
            let e = ulps(exp(x), want);
            assert!(e <= 2.0, "exp({x}) = {} vs {want}: {e} ulp", exp(x));
            worst = worst.max(e);
            x += 0.000_37;
        }
        assert!(worst > 0.0, "exactness everywhere would be suspicious");
    }

    #[test]
    fn ends_of_the_range() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(-104.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        // Subnormal results round once, close to the true value.
        for x in [-88.0f32, -95.0, -100.0, -103.0] {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            assert!(got > 0.0 && (got - want).abs() <= 1.5e-45, "exp({x}) = {got} vs {want}");
        }
        assert!(exp(88.72) < f32::MAX && exp(88.72) > 3.3e38);
    }
}
