//! Prepared weight bytes: made at load (owned) or read in place from a
//! compiled artifact (a range of a shared memory map).
//!
//! Kernels see a plain slice either way. Where weights cannot live in huge
//! pages (below), running a `.bnx` artifact copies nothing: its repacked
//! weights stay in the page cache, shared with every process that maps the
//! same file.
//!
//! Weights made at load of 2 MiB or more live, on Linux, in memory of
//! their own advised to be backed by transparent huge pages (`huge::Huge`),
//! and so do the float matrices a product streams whole, copied out of the
//! model's file ([`Blob::copy_of`]): a step streams every weight once, and
//! with 4 KiB pages each 4 KiB costs a TLB miss (a two-level walk in a
//! virtual machine) that the prefetches do not hide. On a Zen 4 VM one core
//! read 30 GB/s from huge pages against 21 from small ones, and 2B4T's
//! `[2560, 6912]` product on eight tokens from memory ran 15% faster.
//!
//! Smaller weights, from [`SHARED_MIN_BYTES`] up, are packed side by side
//! into shared huge-page slabs (`huge::take`): a mapping of their own each
//! could not hold a whole huge page, and 2B4T's q, k, v and o matrices
//! (0.4 and 1.6 MB) read from small pages made a decode step's q/k/v
//! product take 3.0 ms where it now takes 2.2.

use std::ops::Deref;
use std::sync::Arc;

/// Element types that may be viewed in place from bytes: any bit pattern
/// (all zeros included) is a valid value.
pub trait Plain: Copy + Send + Sync + 'static {}
impl Plain for u8 {}
impl Plain for i8 {}
impl Plain for u16 {}
impl Plain for u64 {}
impl Plain for f32 {}

/// Bytes shared with whoever else keeps the mapping alive.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

pub struct Blob<T: Plain> {
    inner: Inner<T>,
}

enum Inner<T> {
    Owned(Vec<T>),
    #[cfg(target_os = "linux")]
    Huge(huge::Huge<T>),
    /// `len` values at byte `offset` of a slab that other blobs share.
    #[cfg(target_os = "linux")]
    Shared {
        slab: Arc<huge::Slab>,
        offset: usize,
        len: usize,
    },
    Mapped {
        bytes: SharedBytes,
        offset: usize,
        len: usize,
    },
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
    /// Moves `v` in; on Linux, copies one of [`SHARED_MIN_BYTES`] or more
    /// into huge pages (where the kernel has none to give, the copy still
    /// works, on small pages; where no mapping can be made, `v` stays).
    fn from(v: Vec<T>) -> Blob<T> {
        #[cfg(target_os = "linux")]
        if let Some(b) = Blob::huge_copy(&v, &mut || ()) {
            return b;
        }
        Blob { inner: Inner::Owned(v) }
    }
}

/// Weights of this size or more get a huge-page mapping of their own.
pub const HUGE_MIN_BYTES: usize = 2 << 20;

/// Weights smaller than this stay in the allocator's memory; from this
/// size up to [`HUGE_MIN_BYTES`] they share huge-page slabs.
pub const SHARED_MIN_BYTES: usize = 64 << 10;

/// Whether large weights made at load live in huge pages on this system.
pub const HUGE_PAGES: bool = cfg!(target_os = "linux");

/// Whether `bytes` of weights made or copied at load go into huge pages
/// ([`HUGE_PAGES`], and at least [`SHARED_MIN_BYTES`]): where not, a copy
/// out of a file mapping gains nothing over reading the file in place.
pub fn in_huge_pages(bytes: usize) -> bool {
    HUGE_PAGES && bytes >= SHARED_MIN_BYTES
}

impl<T: Plain> Blob<T> {
    /// A copy of `src` in memory of its own (huge pages where
    /// [`HUGE_PAGES`] and `src` is [`SHARED_MIN_BYTES`] or more: a mapping
    /// of its own from [`HUGE_MIN_BYTES`], a part of a shared slab below),
    /// written in pieces of 64 MiB with `after_piece` called after each: a
    /// caller copying out of a file mapping releases the file's pages
    /// there, so that the two copies are never whole at once.
    pub fn copy_of(src: &[T], after_piece: &mut dyn FnMut()) -> Blob<T> {
        #[cfg(target_os = "linux")]
        if let Some(b) = Blob::huge_copy(src, after_piece) {
            return b;
        }
        let v = src.to_vec();
        after_piece();
        Blob { inner: Inner::Owned(v) }
    }

    /// [`Blob::copy_of`] into huge pages; `None` (nothing copied, no
    /// `after_piece`) where `src` is too small for them or no mapping can
    /// be made.
    #[cfg(target_os = "linux")]
    fn huge_copy(src: &[T], after_piece: &mut dyn FnMut()) -> Option<Blob<T>> {
        let bytes = std::mem::size_of_val(src);
        if !in_huge_pages(bytes) {
            return None;
        }
        if bytes >= HUGE_MIN_BYTES {
            return huge::Huge::copy_of(src, after_piece).map(|h| Blob { inner: Inner::Huge(h) });
        }
        let (slab, offset) = huge::take(bytes)?;
        let b = Blob::shared(slab, offset, src.len(), |dst| dst.copy_from_slice(src));
        after_piece();
        Some(b)
    }

    /// The blob of `len` values at `offset` of `slab`, which `take` gave
    /// it, written by `init`.
    #[cfg(target_os = "linux")]
    fn shared(slab: std::sync::Arc<huge::Slab>, offset: usize, len: usize, init: impl FnOnce(&mut [T])) -> Blob<T> {
        // SAFETY: `take` gave this blob bytes `offset..offset + len ·
        // size_of::<T>()` of the slab alone (zeros, a valid `T`), aligned
        // to 64; other blobs touch only their own ranges, and nothing
        // makes a reference to the whole slab.
        init(unsafe { std::slice::from_raw_parts_mut(slab.as_ptr().add(offset) as *mut T, len) });
        Blob { inner: Inner::Shared { slab, offset, len } }
    }

    /// `len` values, all bits zero until `init` writes them, straight into
    /// the memory that keeps them (huge pages as for [`Blob::copy_of`]).
    pub fn build(len: usize, init: impl FnOnce(&mut [T])) -> Blob<T> {
        let bytes = len.saturating_mul(std::mem::size_of::<T>());
        #[cfg(target_os = "linux")]
        if in_huge_pages(bytes) && bytes >= HUGE_MIN_BYTES {
            if let Some(mut h) = huge::Huge::zeroed(len) {
                init(h.values_mut());
                return Blob { inner: Inner::Huge(h) };
            }
        } else if in_huge_pages(bytes) {
            if let Some((slab, offset)) = huge::take(bytes) {
                return Blob::shared(slab, offset, len, init);
            }
        }
        // SAFETY: all bits zero is a value of every `Plain` type.
        let mut v = vec![unsafe { std::mem::zeroed::<T>() }; len];
        init(&mut v);
        Blob { inner: Inner::Owned(v) }
    }

    /// `len` values, value `i` being `value(i)`, as [`Blob::build`] keeps them.
    pub fn from_fn(len: usize, value: impl Fn(usize) -> T) -> Blob<T> {
        Blob::build(len, |vals| vals.iter_mut().enumerate().for_each(|(i, v)| *v = value(i)))
    }
}

impl<T: Plain> Deref for Blob<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.inner {
            Inner::Owned(v) => v,
            #[cfg(target_os = "linux")]
            Inner::Huge(h) => h,
            // SAFETY: the range was this blob's alone since `take`, written
            // once by `build`, aligned, and lives while `slab` is held.
            #[cfg(target_os = "linux")]
            Inner::Shared { slab, offset, len } => unsafe { std::slice::from_raw_parts(slab.as_ptr().add(*offset) as *const T, *len) },
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

#[cfg(target_os = "linux")]
mod huge {
    use super::Plain;
    use std::ptr::NonNull;

    /// The size of a transparent huge page on x86-64 and most AArch64.
    const HUGE_PAGE: usize = 2 << 20;
    const SMALL_PAGE: usize = 4096;

    /// Bytes copied between two calls of the caller's `after_piece`.
    const PIECE: usize = 64 << 20;

    /// A private anonymous mapping of whole small pages that starts on a
    /// huge-page boundary and is advised `MADV_HUGEPAGE`: every 2 MiB of it
    /// can be one huge page, and the rest (the last part) small pages, so
    /// none is allocated beyond the data's own pages.
    pub struct Huge<T> {
        ptr: NonNull<T>,
        len: usize,
        mapped: usize,
    }

    // SAFETY: `Huge` owns its mapping alone, and `T: Plain` is `Send + Sync`.
    unsafe impl<T: Plain> Send for Huge<T> {}
    // SAFETY: as above; `&Huge` gives out shared slices only (a `Slab`
    // wraps one and gives out its address alone, for blobs' disjoint ranges).
    unsafe impl<T: Plain> Sync for Huge<T> {}

    impl<T: Plain> Huge<T> {
        /// A mapping for `len` values, all bits zero; `None` where the
        /// mapping fails.
        pub fn zeroed(len: usize) -> Option<Huge<T>> {
            let bytes = len.checked_mul(std::mem::size_of::<T>())?;
            let mapped = bytes.next_multiple_of(SMALL_PAGE);
            let over = mapped.checked_add(HUGE_PAGE)?;
            // SAFETY: a fresh private anonymous mapping; no existing memory is named.
            let raw = unsafe { libc::mmap(std::ptr::null_mut(), over, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
            if raw == libc::MAP_FAILED {
                return None;
            }
            let start = raw as usize;
            let aligned = start.next_multiple_of(HUGE_PAGE);
            let (head, tail) = (aligned - start, start + over - (aligned + mapped));
            // SAFETY: the head and tail are the parts of the mapping made
            // above that lie outside [aligned, aligned + mapped), page-aligned
            // (both ends of the mapping and `aligned` are); unmapping them and
            // advising the rest touch nothing else. The advice is a hint: where
            // the kernel refuses it, the pages are small.
            unsafe {
                if head > 0 {
                    libc::munmap(raw, head);
                }
                if tail > 0 {
                    libc::munmap((aligned + mapped) as *mut libc::c_void, tail);
                }
                libc::madvise(aligned as *mut libc::c_void, mapped, libc::MADV_HUGEPAGE);
            }
            // Anonymous memory reads as zeros: a valid `T` (`Plain`).
            Some(Huge { ptr: NonNull::new(aligned as *mut T)?, len, mapped })
        }

        /// A copy of `src`, `after_piece` called after each [`PIECE`]
        /// bytes of it.
        pub fn copy_of(src: &[T], after_piece: &mut dyn FnMut()) -> Option<Huge<T>> {
            let mut h = Self::zeroed(src.len())?;
            let per_piece = (PIECE / std::mem::size_of::<T>().max(1)).max(1);
            for (dst, piece) in h.values_mut().chunks_mut(per_piece).zip(src.chunks(per_piece)) {
                dst.copy_from_slice(piece);
                after_piece();
            }
            Some(h)
        }

        /// The first value's address, for views of parts of the mapping
        /// (a shared slab's blobs).
        pub fn as_ptr(&self) -> *mut T {
            self.ptr.as_ptr()
        }

        pub fn values_mut(&mut self) -> &mut [T] {
            // SAFETY: the mapping holds `len` values of `T` (any bit pattern
            // is one), lives until `self` drops, and `&mut self` is unique.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
        }
    }

    /// The size of a slab that weights under [`super::HUGE_MIN_BYTES`]
    /// share: only the pages written are ever allocated.
    const SLAB: usize = 32 << 20;

    /// A huge-page mapping whose ranges belong to different blobs, each
    /// written by one thread while others read theirs: it gives out its
    /// address only, never a reference to all of it (no `Deref`).
    pub struct Slab(Huge<u8>);

    impl Slab {
        pub fn as_ptr(&self) -> *mut u8 {
            self.0.as_ptr()
        }
    }

    /// The slab being filled, and how many of its bytes are given out.
    /// Held weakly: a slab lives while a blob in it does (so one engine's
    /// last slab may hold another's weights too, and stay as long).
    static FILLING: std::sync::Mutex<(std::sync::Weak<Slab>, usize)> = std::sync::Mutex::new((std::sync::Weak::new(), 0));

    /// `bytes` of a slab, aligned to 64 and given to no one else: the slab
    /// and the range's offset. `None` where `bytes` is more than a slab
    /// holds or no slab can be mapped.
    pub fn take(bytes: usize) -> Option<(std::sync::Arc<Slab>, usize)> {
        if bytes > SLAB {
            return None;
        }
        let mut filling = FILLING.lock().unwrap_or_else(|e| e.into_inner());
        let at = filling.1.next_multiple_of(64);
        if let Some(slab) = filling.0.upgrade().filter(|_| at + bytes <= SLAB) {
            filling.1 = at + bytes;
            return Some((slab, at));
        }
        let slab = std::sync::Arc::new(Slab(Huge::zeroed(SLAB)?));
        *filling = (std::sync::Arc::downgrade(&slab), bytes);
        Some((slab, 0))
    }

    impl<T: Plain> std::ops::Deref for Huge<T> {
        type Target = [T];
        fn deref(&self) -> &[T] {
            // SAFETY: the mapping holds `len` values of `T` at `ptr` (zeros,
            // a valid `Plain` value, until written), and lives until `self`
            // drops.
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
        }
    }

    impl<T> Drop for Huge<T> {
        fn drop(&mut self) {
            // SAFETY: exactly the range `zeroed` kept mapped, unmapped once.
            unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.mapped) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large weights land in their own huge-page mapping, middling ones in
    /// a shared slab, small ones stay in the vector; all read back what
    /// went in, at every length around the thresholds and the page sizes.
    #[test]
    fn owned_weights_read_back_whatever_memory_holds_them() {
        for len in [0usize, 1, 3, 4095, 4097, (64 << 10) - 1, 64 << 10, (2 << 20) - 1, 2 << 20, (2 << 20) + 1, (6 << 20) + 12345] {
            let v: Vec<u8> = (0..len).map(|i| (i * 31 + i / 4096) as u8).collect();
            let b = Blob::from(v.clone());
            assert_eq!(&*b, &v[..], "{len} bytes");
            #[cfg(target_os = "linux")]
            {
                assert_eq!(matches!(b.inner, Inner::Huge(_)), len >= HUGE_MIN_BYTES, "{len} bytes");
                assert!(len < HUGE_MIN_BYTES || (b.as_ptr() as usize).is_multiple_of(2 << 20), "aligned to a huge page");
                let shared = (SHARED_MIN_BYTES..HUGE_MIN_BYTES).contains(&len);
                assert_eq!(matches!(b.inner, Inner::Shared { .. }), shared, "{len} bytes");
                assert!(!shared || (b.as_ptr() as usize).is_multiple_of(64), "aligned to a cache line");
            }
            let mut pieces = 0;
            let c = Blob::copy_of(&v, &mut || pieces += 1);
            assert_eq!(&*c, &v[..], "{len} bytes, copied");
            assert_eq!(pieces, if HUGE_PAGES && len >= HUGE_MIN_BYTES { len.div_ceil(64 << 20) } else { 1 }, "{len} bytes");
        }
        let big: Vec<u16> = (0..(70 << 20) / 2).map(|i| i as u16).collect();
        let mut pieces = 0;
        assert_eq!(&*Blob::copy_of(&big, &mut || pieces += 1), &big[..]);
        assert_eq!(pieces, if HUGE_PAGES { 2 } else { 1 }, "70 MiB in pieces of 64");
        for len in [0, 5, (3 << 20) / 2 + 3] {
            let b = Blob::from_fn(len, |i| (i * 7) as u16);
            assert!(b.iter().enumerate().all(|(i, &v)| v == (i * 7) as u16) && b.len() == len, "{len} values");
        }
        let floats: Vec<f32> = (0..(1 << 20) + 7).map(|i| i as f32 * 0.5).collect();
        assert_eq!(&*Blob::from(floats.clone()), &floats[..]);
    }

    /// Weights made on many threads at once share slabs without sharing
    /// bytes: each reads back what went in, and a copy lands in a slab too.
    #[test]
    fn weights_made_at_once_share_slabs_not_bytes() {
        let sizes = |t: usize| (0..24).map(move |i| SHARED_MIN_BYTES + (t * 7919 + i * 104729) % (HUGE_MIN_BYTES - SHARED_MIN_BYTES));
        let blobs: Vec<Vec<Blob<u8>>> = std::thread::scope(|s| {
            let made: Vec<_> =
                (0..8).map(|t| s.spawn(move || sizes(t).enumerate().map(|(i, n)| Blob::from_fn(n, |j| (j + 31 * i + 101 * t) as u8)).collect())).collect();
            made.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (t, mine) in blobs.iter().enumerate() {
            for ((i, n), b) in sizes(t).enumerate().zip(mine) {
                assert!(b.len() == n && b.iter().enumerate().all(|(j, &v)| v == (j + 31 * i + 101 * t) as u8), "thread {t} blob {i}");
                #[cfg(target_os = "linux")]
                assert!(matches!(b.inner, Inner::Shared { .. }) && (b.as_ptr() as usize).is_multiple_of(64), "thread {t} blob {i}");
            }
        }
        let floats: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
        let copy = Blob::copy_of(&floats, &mut || ());
        assert_eq!(&*copy, &floats[..]);
        #[cfg(target_os = "linux")]
        {
            assert!(matches!(copy.inner, Inner::Shared { .. }));
            assert!(huge::take((32 << 20) + 1).is_none(), "more than a slab holds");
        }
    }

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
