//! Prepared weight bytes: made at load (owned) or read in place from a
//! compiled artifact (a range of a shared memory map).
//!
//! Kernels see a plain slice either way, so running a `.bnx` artifact
//! copies nothing: its repacked weights stay in the page cache, shared
//! with every process that maps the same file.

use std::ops::Deref;
use std::sync::Arc;

/// Element types that may be viewed in place from bytes: any bit pattern
/// is a valid value.
pub trait Plain: Copy + Send + Sync + 'static {}
impl Plain for u8 {}
impl Plain for i8 {}
impl Plain for u16 {}
impl Plain for f32 {}

/// Bytes shared with whoever else keeps the mapping alive.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

pub struct Blob<T: Plain> {
    inner: Inner<T>,
}

enum Inner<T> {
    Owned(Vec<T>),
    Mapped { bytes: SharedBytes, offset: usize, len: usize },
}

impl<T: Plain> Blob<T> {
    /// `len` elements of `bytes` at byte `offset`, checked to lie inside
    /// and to be aligned for `T`.
    pub fn mapped(bytes: SharedBytes, offset: usize, len: usize) -> Result<Blob<T>, String> {
        let size = std::mem::size_of::<T>();
        let all = (*bytes).as_ref();
        let end = len.checked_mul(size).and_then(|n| n.checked_add(offset));
        if end.is_none_or(|e| e > all.len()) {
            return Err(format!("{len} × {size} bytes at offset {offset} run past the end ({} bytes): truncated?", all.len()));
        }
        if !(all.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(format!("offset {offset} is not aligned for {size}-byte elements"));
        }
        Ok(Blob { inner: Inner::Mapped { bytes, offset, len } })
    }

    /// The raw bytes, as an artifact stores them.
    pub fn as_bytes(&self) -> &[u8] {
        let s: &[T] = self;
        // SAFETY: `T` is plain data; the byte view covers exactly the slice.
        unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.inner, Inner::Mapped { .. })
    }
}

impl<T: Plain> From<Vec<T>> for Blob<T> {
    fn from(v: Vec<T>) -> Blob<T> {
        Blob { inner: Inner::Owned(v) }
    }
}

impl<T: Plain> Deref for Blob<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.inner {
            Inner::Owned(v) => v,
            Inner::Mapped { bytes, offset, len } => {
                let all = (**bytes).as_ref();
                // SAFETY: bounds and alignment were checked in `mapped`, the
                // bytes live as long as `self` holds the Arc, and `T` accepts
                // any bit pattern.
                unsafe { std::slice::from_raw_parts(all.as_ptr().add(*offset) as *const T, *len) }
            }
        }
    }
}

impl<T: Plain + std::fmt::Debug> std::fmt::Debug for Blob<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({} elements{})", self.len(), if self.is_mapped() { ", mapped" } else { "" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_views_are_checked() {
        let bytes: SharedBytes = Arc::new(vec![0u8; 64]);
        let b = Blob::<f32>::mapped(bytes.clone(), 8, 4).unwrap();
        assert_eq!(&*b, &[0.0; 4]);
        assert_eq!(b.as_bytes().len(), 16);
        assert!(Blob::<f32>::mapped(bytes.clone(), 60, 2).unwrap_err().contains("past the end"));
        assert!(Blob::<u8>::mapped(bytes.clone(), usize::MAX, 2).is_err());
        assert!(Blob::<f32>::mapped(bytes, usize::MAX - 3, usize::MAX / 2).is_err());
    }
}
