//! Structs a C caller fills and passes by pointer, versioned by their first
//! field, `struct_size`: the size of the struct as the caller's header
//! declares it. The header's `_default()` functions are `static inline`, so
//! they are compiled into the caller and pass its `sizeof` to the library's
//! `_init` (a by-value default made by the library would carry the
//! library's size, and overrun an older caller's smaller struct).
//!
//! - A caller built against an older header (a shorter struct, of a size
//!   some release had) gets the defaults for the fields it lacks.
//! - A caller built against a newer header than the library is refused, so
//!   that no option it set is silently ignored.
//! - A size no release had (a struct not filled by its `_default()`: 0, or
//!   garbage) is refused.
//!
//! The structs have no implicit padding (a field that ends short of the
//! alignment is followed by explicit reserved bytes, and `u64` fields sit at
//! multiples of 8, so that this holds where a `u64` is 4-aligned too): every
//! release's struct is a prefix of the next one's, and its size is where its
//! fields end.

/// A struct read through [`read`] and filled through [`init`].
///
/// # Safety
/// The struct is `#[repr(C)]`, begins with its `u32` size, has no implicit
/// padding, lists every `bool` field in [`Versioned::BOOLS`], and has no
/// other field with invalid bit patterns (no enums, no references); its
/// [`Versioned::RELEASED`] sizes pass [`releases_fit`] (checked at compile
/// time where it is implemented).
pub unsafe trait Versioned: Copy {
    /// Its name in the header.
    const NAME: &'static str;
    /// The header's inline function that fills it (through `_init`).
    const DEFAULT_FN: &'static str;
    /// Every release's size, oldest first, as literals (a size computed
    /// from the struct would drop the old ones when it grows); the last is
    /// this struct's.
    const RELEASED: &'static [usize];
    /// The offsets of its `bool` fields (a byte that is neither 0 nor 1
    /// there is refused: it is not a `bool`).
    const BOOLS: &'static [usize];

    /// The defaults, with `struct_size` this struct's size.
    fn defaults() -> Self;
}

/// Whether `released` sizes grow, end at `size` (the struct's own), and so
/// are none of them larger: what makes [`read`]'s copy stay in bounds.
pub const fn releases_fit(released: &[usize], size: usize) -> bool {
    let mut i = 0;
    while i < released.len() {
        if released[i] > size || (i > 0 && released[i - 1] >= released[i]) {
            return false;
        }
        i += 1;
    }
    !released.is_empty() && released[released.len() - 1] == size
}

/// Fills the caller's struct of `size` bytes at `p` with the defaults of
/// the fields this library knows (at most `size` bytes) and sets its
/// `struct_size` to `size`. A size that no release had is an error, but the
/// size is still written, so that the struct's use reports it again.
///
/// # Safety
/// `p` is non-null and writable for `size` bytes.
pub unsafe fn init<T: Versioned>(p: *mut T, size: usize) -> Result<(), String> {
    let ours = size_of::<T>();
    let Ok(size32) = u32::try_from(size) else { return Err(unknown_size::<T>(size)) };
    if size < size_of::<u32>() {
        return Err(unknown_size::<T>(size));
    }
    let defaults = T::defaults();
    let bytes = p.cast::<u8>();
    // SAFETY: the caller's struct is `size` bytes; the defaults are `ours`.
    unsafe {
        std::ptr::copy_nonoverlapping((&defaults as *const T).cast::<u8>(), bytes, size.min(ours));
        bytes.cast::<u32>().write_unaligned(size32);
    }
    check_size::<T>(size)
}

/// `*p` as this library's `T`: the caller's fields, and the defaults for
/// those its release lacks.
///
/// # Safety
/// `p` is non-null, and readable for the size its first field, a `u32`,
/// gives (as a struct filled by [`init`] is).
pub unsafe fn read<T: Versioned>(p: *const T) -> Result<T, String> {
    // SAFETY: the caller's struct begins with its size.
    let size = unsafe { p.cast::<u32>().read_unaligned() } as usize;
    check_size::<T>(size)?;
    if size > size_of::<T>() {
        unreachable!("{}: a released size beyond the struct's (releases_fit)", T::NAME);
    }
    let bytes = p.cast::<u8>();
    for &at in T::BOOLS.iter().filter(|&&at| at < size) {
        // SAFETY: within the caller's `size` bytes.
        let b = unsafe { *bytes.add(at) };
        if b > 1 {
            return Err(format!("{}: the bool at byte {at} holds {b}: a bool is 0 or 1", T::NAME));
        }
    }
    let mut out = T::defaults();
    // SAFETY: `size` is a release's, at most this struct's; the caller's
    // struct has those bytes, and they are a prefix of this struct (no
    // implicit padding), its bools checked above.
    unsafe { std::ptr::copy_nonoverlapping(bytes, (&mut out as *mut T).cast::<u8>(), size) };
    // SAFETY: `out` is a T, which begins with a u32.
    unsafe { (&mut out as *mut T).cast::<u32>().write_unaligned(size_of::<T>() as u32) };
    Ok(out)
}

fn check_size<T: Versioned>(size: usize) -> Result<(), String> {
    let ours = size_of::<T>();
    if T::RELEASED.contains(&size) {
        Ok(())
    } else if size > ours && size <= 4096 {
        Err(format!(
            "{}.struct_size is {size}, larger than this library's {ours} bytes: the caller was built against a newer bitnet.h \
             (update the library, or rebuild against its header), or did not fill the struct with {}()",
            T::NAME,
            T::DEFAULT_FN
        ))
    } else {
        Err(unknown_size::<T>(size))
    }
}

fn unknown_size<T: Versioned>(size: usize) -> String {
    format!(
        "{}.struct_size is {size}, not the size of any release's {} ({} bytes here): fill the struct with {}()",
        T::NAME,
        T::NAME,
        size_of::<T>(),
        T::DEFAULT_FN
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    /// A struct in its second release: `b` and `c` came later.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Two {
        struct_size: u32,
        a: u32,
        flag: bool,
        reserved: [u8; 3],
        b: u32,
        c: u64,
    }

    /// The same struct as its first release declared it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct One {
        struct_size: u32,
        a: u32,
        flag: bool,
        reserved: [u8; 3],
    }

    /// `Two` with its bool as a byte, to hold a value a bool cannot.
    #[repr(C)]
    struct TwoBytes {
        struct_size: u32,
        a: u32,
        flag: u8,
        reserved: [u8; 3],
        b: u32,
        c: u64,
    }

    // SAFETY: repr(C), a u32 size first, no padding, its bool listed, no
    // other field with invalid bit patterns; the sizes are checked below.
    unsafe impl Versioned for Two {
        const NAME: &'static str = "Two";
        const DEFAULT_FN: &'static str = "two_default";
        const RELEASED: &'static [usize] = &[12, 24];
        const BOOLS: &'static [usize] = &[offset_of!(Two, flag)];

        fn defaults() -> Two {
            Two { struct_size: size_of::<Two>() as u32, a: 1, flag: true, reserved: [0; 3], b: 7, c: 8 }
        }
    }

    #[test]
    fn release_sizes_must_grow_and_end_at_the_struct() {
        assert!(releases_fit(Two::RELEASED, size_of::<Two>()));
        assert!(!releases_fit(&[24, 12], 24) && !releases_fit(&[12, 32], 24) && !releases_fit(&[12], 24) && !releases_fit(&[], 24));
    }

    #[test]
    fn an_older_caller_gets_the_defaults_for_what_its_release_lacks() {
        assert_eq!((size_of::<One>(), size_of::<Two>()), (12, 24));
        let mut old = One { struct_size: 0, a: 0, flag: false, reserved: [0xee; 3] };
        // SAFETY: `old` is a One, of the size given.
        unsafe { init(&mut old as *mut One as *mut Two, size_of::<One>()) }.unwrap();
        assert_eq!(old, One { struct_size: 12, a: 1, flag: true, reserved: [0; 3] }, "init writes the caller's bytes only");
        old.a = 9;
        // SAFETY: as above.
        let got = unsafe { read(&old as *const One as *const Two) }.unwrap();
        assert_eq!(got, Two { struct_size: 24, a: 9, flag: true, reserved: [0; 3], b: 7, c: 8 });
    }

    #[test]
    fn a_newer_unfilled_or_broken_struct_is_refused_clearly() {
        #[repr(C)]
        struct Three {
            two: Two,
            d: u64,
        }
        let mut newer = Three { two: Two::defaults(), d: 5 };
        // SAFETY: `newer` is a Three, of the size given.
        let e = unsafe { init(&mut newer as *mut Three as *mut Two, size_of::<Three>()) }.unwrap_err();
        assert!(e.contains("newer bitnet.h"), "{e}");
        assert_eq!((newer.two.struct_size, newer.d), (32, 5), "the size is written, the unknown tail left alone");
        // SAFETY: as above.
        let e = unsafe { read(&newer as *const Three as *const Two) }.unwrap_err();
        assert!(e.contains("newer bitnet.h"), "{e}");
        for size in [0, 5, 20, 1 << 20] {
            let s = Two { struct_size: size, ..Two::defaults() };
            // SAFETY: a Two, at least as long as any size accepted.
            let e = unsafe { read(&s) }.unwrap_err();
            assert!(e.contains("fill the struct with two_default()"), "{size}: {e}");
        }
        let s = TwoBytes { struct_size: 24, a: 1, flag: 2, reserved: [0; 3], b: 7, c: 8 };
        assert_eq!(offset_of!(TwoBytes, flag), offset_of!(Two, flag));
        // SAFETY: Two's layout, 24 bytes.
        let e = unsafe { read(&s as *const TwoBytes as *const Two) }.unwrap_err();
        assert!(e.contains("the bool at byte 8 holds 2"), "{e}");
        let same = Two { a: 4, b: 5, ..Two::defaults() };
        // SAFETY: a Two.
        assert_eq!(unsafe { read(&same) }, Ok(same));
    }
}
