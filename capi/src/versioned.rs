//! Structs a C caller fills and passes by pointer, versioned by their first
//! field, `struct_size`: the size of the struct as the caller's header
//! declared it. A caller built against an older header (a shorter struct)
//! gets the defaults for the fields it lacks; one built against a newer
//! header than this library is refused, so that no option it set is
//! silently ignored; a struct not filled by its `_default` function (a
//! size of 0 or garbage) is refused with a message that says so.

/// A struct read through [`read`].
pub trait Versioned: Copy {
    /// Its name in the header, and the function that fills it.
    const NAME: &'static str;
    const DEFAULT_FN: &'static str;
    /// Every released layout, oldest first: its size, and how many of its
    /// leading bytes are fields (not tail padding that a later field may
    /// take). The last is this struct. Sizes tell the releases apart, so
    /// each must be longer than the one before: a field that would fit in
    /// the last release's tail padding comes with a reserved field that
    /// makes the struct grow.
    const LAYOUTS: &'static [Layout];

    fn defaults() -> Self;
}

#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub size: usize,
    pub fields: usize,
}

impl Layout {
    /// A layout with no tail padding, or the newest one.
    pub const fn whole(size: usize) -> Layout {
        Layout { size, fields: size }
    }
}

/// `*p` as this library's `T`: the bytes of the fields the caller's layout
/// has, the defaults for the rest. `p` is non-null and points at a struct
/// whose first field is a `u32` giving its size.
pub fn read<T: Versioned>(p: *const T) -> Result<T, String> {
    debug_assert_eq!(T::LAYOUTS.last().map(|l| l.size), Some(size_of::<T>()));
    debug_assert!(T::LAYOUTS.windows(2).all(|w| w[0].size < w[1].size && w[0].fields <= w[0].size));
    // SAFETY: the caller's struct begins with its size, a u32.
    let size = unsafe { p.cast::<u32>().read_unaligned() } as usize;
    let Some(layout) = T::LAYOUTS.iter().find(|l| l.size == size) else {
        let ours = size_of::<T>();
        return Err(if size > ours {
            format!(
                "{}.struct_size is {size}: the caller was built against a newer bitnet.h than this library's ({ours} bytes); update the library or rebuild against its header",
                T::NAME
            )
        } else {
            format!(
                "{}.struct_size is {size}, not the size of any release's {} ({ours} bytes here): fill the struct with {}()",
                T::NAME,
                T::NAME,
                T::DEFAULT_FN
            )
        });
    };
    let mut out = T::defaults();
    // SAFETY: the caller's struct is `layout.size` bytes long, which is at
    // least `layout.fields`, and `out` is a T, longer still; the fields'
    // bytes are at the same offsets in every layout.
    unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), (&mut out as *mut T).cast::<u8>(), layout.fields) };
    // The struct now says what it is: this library's.
    // SAFETY: as above; the first field is a u32.
    unsafe { (&mut out as *mut T).cast::<u32>().write_unaligned(size_of::<T>() as u32) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A struct in its second release: `b` came later, at an offset that
    /// was the first release's tail padding, so a reserved field makes the
    /// struct grow.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Two {
        struct_size: u32,
        a: u8,
        b: u8,
        reserved: [u8; 6],
    }

    /// The same struct as its first release declared it.
    #[repr(C)]
    struct One {
        struct_size: u32,
        a: u8,
        padding: [u8; 3],
    }

    impl Versioned for Two {
        const NAME: &'static str = "Two";
        const DEFAULT_FN: &'static str = "two_default";
        const LAYOUTS: &'static [Layout] = &[Layout { size: size_of::<One>(), fields: 5 }, Layout::whole(size_of::<Two>())];

        fn defaults() -> Two {
            Two { struct_size: size_of::<Two>() as u32, a: 1, b: 7, reserved: [0; 6] }
        }
    }

    #[test]
    fn an_older_callers_struct_gets_the_defaults_for_what_it_lacks() {
        assert_eq!((size_of::<One>(), size_of::<Two>()), (8, 12));
        // Garbage in the old struct's padding must not become b.
        let old = One { struct_size: 5, a: 9, padding: [0xee; 3] };
        let got = read(&old as *const One as *const Two);
        assert!(got.is_err(), "5 is not a released size: {got:?}");
        let old = One { struct_size: size_of::<One>() as u32, a: 9, padding: [0xee; 3] };
        let got = read(&old as *const One as *const Two).unwrap();
        assert_eq!(got, Two { struct_size: 12, a: 9, b: 7, reserved: [0; 6] });
    }

    #[test]
    fn a_newer_or_unfilled_struct_is_refused_clearly() {
        #[repr(C)]
        struct Three {
            two: Two,
            c: u64,
        }
        let newer = Three { two: Two { struct_size: size_of::<Three>() as u32, a: 1, b: 2, reserved: [0; 6] }, c: 3 };
        let e = read(&newer as *const Three as *const Two).unwrap_err();
        assert!(e.contains("newer bitnet.h"), "{e}");
        let zero = Two { struct_size: 0, a: 1, b: 2, reserved: [0; 6] };
        let e = read(&zero).unwrap_err();
        assert!(e.contains("fill the struct with two_default()"), "{e}");
        let same = Two { struct_size: 12, a: 4, b: 5, reserved: [0; 6] };
        assert_eq!(read(&same), Ok(same));
    }
}
