//! Growable buffers that start on a cache line.
//!
//! The prefill kernels read activation rows and unpacked weight codes 32
//! bytes at a time. A `Vec<u8>` asks the allocator for 1-byte alignment
//! (glibc's malloc gives 16, large blocks 16 bytes past a page), and from
//! a buffer that starts mid-line every other such load spans two lines. On
//! a 2-core Zen 3 (AVX2) 2B4T's `[2560, 6912]` product on 128 tokens ran
//! 7% faster with tiles of 4 rows × 2 tokens, and 18% with 4 × 4, from
//! line-aligned buffers than from buffers 16 bytes past a line (see
//! docs/performance.md).

use super::blob::Plain;
use std::ops::{Deref, DerefMut};

pub const LINE: usize = 64;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; LINE]);

const ZERO: Line = Line([0; LINE]);

/// A `Vec<T>` whose first value starts a cache line.
#[derive(Clone)]
pub struct LineVec<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _values: std::marker::PhantomData<T>,
}

impl<T: Plain> LineVec<T> {
    pub fn new() -> LineVec<T> {
        const { assert!(std::mem::align_of::<T>() <= LINE, "LineVec: values aligned beyond a cache line") };
        LineVec { lines: Vec::new(), len: 0, _values: std::marker::PhantomData }
    }

    /// Resizes to `len` values, the new ones `value`, as `Vec::resize`.
    pub fn resize(&mut self, len: usize, value: T) {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).expect("LineVec: size overflows usize");
        self.lines.resize(bytes.div_ceil(LINE), ZERO);
        let old = self.len;
        self.len = len;
        if len > old {
            self[old..].fill(value);
        }
    }
}

impl<T: Plain> Default for LineVec<T> {
    fn default() -> LineVec<T> {
        LineVec::new()
    }
}

impl<T: Plain> Deref for LineVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least `len` values' bytes, aligned for
        // `T` (`new`, the only constructor, checks that `T`'s alignment
        // divides a line's), and `Plain` values may take any bit pattern.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl<T: Plain> DerefMut for LineVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` borrows the lines alone.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

impl<T: Plain + PartialEq> PartialEq for LineVec<T> {
    fn eq(&self, other: &LineVec<T>) -> bool {
        **self == **other
    }
}

impl<T: Plain + std::fmt::Debug> std::fmt::Debug for LineVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_line_and_resizes_like_a_vec() {
        let mut v = LineVec::<i8>::new();
        let mut reference = Vec::new();
        for (len, value) in [(1, 3), (3, -1), (783, 7), (2592, -128), (64, 0), (0, 1), (65, 5), (100, 1), (70, 2), (90, 3)] {
            v.resize(len, value);
            reference.resize(len, value);
            assert_eq!(*v, reference[..], "len {len}");
            assert_eq!(v.as_ptr() as usize % LINE, 0, "len {len}");
            v.iter_mut().enumerate().for_each(|(i, x)| *x = (i % 251) as i8);
            reference.iter_mut().enumerate().for_each(|(i, x)| *x = (i % 251) as i8);
        }
        let mut wide = LineVec::<f32>::new();
        wide.resize(3, 1.5);
        assert_eq!(*wide, [1.5; 3]);
        assert_eq!(wide.as_ptr() as usize % LINE, 0);
        assert_eq!(wide.clone(), wide);
    }
}
