//! The generated CUDA C run on the CPU, for testing kernels where there is
//! no GPU: the module is compiled by the host's C++ compiler (`g++`, or
//! `$CXX`) against `emulator.h`, which runs every CUDA thread of a block
//! as a fiber on the calling thread, with barriers for `__syncthreads`,
//! warp shuffles and the tensor cores' `mma` (a deadlock is an error, not
//! a hang). Blocks run one after another, the last first or the first
//! first ([`BlockOrder`]).
//!
//! It checks what a kernel computes (its indexing, its reductions, the
//! fragment layout of its `mma`s), not how fast it is; a launch of
//! thousands of threads takes a while. Arguments follow the CUDA launch
//! convention: one value a parameter, pointers as 64-bit addresses of
//! host memory.

use super::Kernel;
use std::path::PathBuf;

/// The host side of the CUDA C the kernels use.
pub const HEADER: &str = include_str!("emulator.h");

/// One kernel parameter's value.
#[derive(Clone, Copy, Debug)]
pub enum Param {
    /// A buffer: the address of its first element.
    Ptr(u64),
    F32(f32),
    I32(i32),
}

impl Param {
    pub fn of<T>(buf: &mut [T]) -> Param {
        Param::Ptr(buf.as_mut_ptr() as u64)
    }
}

/// Host memory for kernels to read and write through its address:
/// zeroed, 16-byte aligned (the kernels' vector loads want that).
pub struct Buffer {
    ptr: *mut u128,
    len: usize,
}

impl Buffer {
    pub fn zeroed(bytes: usize) -> Buffer {
        let len = bytes.div_ceil(16).max(1);
        let ptr = Box::into_raw(vec![0u128; len].into_boxed_slice()).cast::<u128>();
        Buffer { ptr, len }
    }

    /// A copy of `values`.
    pub fn of<T: Copy>(values: &[T]) -> Buffer {
        let b = Buffer::zeroed(std::mem::size_of_val(values));
        b.write(values);
        b
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    pub fn param(&self) -> Param {
        Param::Ptr(self.addr())
    }

    /// Overwrites the first values.
    pub fn write<T: Copy>(&self, values: &[T]) {
        assert!(std::mem::size_of_val(values) <= self.len * 16, "{} bytes into a buffer of {}", std::mem::size_of_val(values), self.len * 16);
        // SAFETY: in bounds (checked); a `Module` runs launches on the
        // calling thread, so no kernel runs meanwhile.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.cast::<T>(), values.len()) };
    }

    /// The first `n` values.
    pub fn read<T: Copy>(&self, n: usize) -> Vec<T> {
        assert!(n * std::mem::size_of::<T>() <= self.len * 16, "{n} values out of a buffer of {} bytes", self.len * 16);
        // SAFETY: in bounds (checked), aligned for any number type, and no
        // kernel runs meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<T>(), n) }.to_vec()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: made by `Box::into_raw` of a slice of `len`.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

/// The order a launch's blocks run in, one after another. A GPU runs them
/// in no order: a kernel whose blocks read what other blocks of the same
/// launch write gives a different result in one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOrder {
    /// The last block first (the default).
    LastFirst,
    FirstFirst,
}

impl BlockOrder {
    pub const ALL: [BlockOrder; 2] = [BlockOrder::LastFirst, BlockOrder::FirstFirst];
}

/// A module of kernels compiled for the host.
pub struct Module {
    lib: libloading::Library,
    /// The emulator's state is the module's: one launch at a time.
    running: std::sync::Mutex<()>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The parameter types of a kernel's source, `extern "C" __global__ void
/// … name(T a, U b, …) {`, in order.
fn param_types(k: &Kernel) -> Result<Vec<String>, String> {
    let open = k.source.find(&format!("{}(", k.name)).ok_or_else(|| format!("{}: no parameter list", k.name))? + k.name.len() + 1;
    let close = open + k.source[open..].find(')').ok_or_else(|| format!("{}: an open parameter list", k.name))?;
    k.source[open..close]
        .split(',')
        .map(|p| {
            let p = p.trim();
            let at = p.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).ok_or_else(|| format!("{}: parameter `{p}` has no type", k.name))?;
            Ok(p[..=at].trim().to_string())
        })
        .collect()
}

impl Module {
    /// Compiles `prelude` and `kernels` for the host. Fails with the
    /// compiler's message, or when there is no C++20 compiler.
    pub fn build(prelude: &str, kernels: &[&Kernel]) -> Result<Module, String> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = TempDir(std::env::temp_dir().join(format!("bitnet-cuda-emulator-{}-{n}", std::process::id())));
        std::fs::create_dir_all(&dir.0).map_err(|e| format!("{}: {e}", dir.0.display()))?;
        let mut src = format!("{HEADER}\n{prelude}\nextern \"C\" void emu_set_forward(int f) {{ emu::forward = f != 0; }}\n");
        for k in kernels {
            src += &k.source;
            let types = param_types(k)?;
            let call: Vec<String> = types.iter().enumerate().map(|(i, t)| format!("*({t}*)args[{i}]")).collect();
            src += &format!(
                "extern \"C\" int emu_launch_{name}(unsigned gx, unsigned gy, unsigned block, void** args) {{\n    \
                 return emu::run(dim3{{gx, gy, 1}}, block, [=] {{ {name}({call}); }});\n}}\n",
                name = k.name,
                call = call.join(", ")
            );
        }
        let (cpp, so) = (dir.0.join("module.cpp"), dir.0.join("module.so"));
        std::fs::write(&cpp, src).map_err(|e| format!("{}: {e}", cpp.display()))?;
        // `-fno-gnu-unique`: each module keeps its own emulator state (the
        // block being run, the statics of `__shared__`), which GCC would
        // otherwise make one per process across every module loaded.
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
        let out = std::process::Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-fPIC", "-shared", "-fno-gnu-unique", "-w", "-o"])
            .arg(&so)
            .arg(&cpp)
            .output()
            .map_err(|e| format!("running {cxx}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{cxx} failed on {}:\n{}", cpp.display(), String::from_utf8_lossy(&out.stderr)));
        }
        // SAFETY: the library is the module just compiled; its initializers
        // are the C++ runtime's.
        let lib = unsafe { libloading::Library::new(&so) }.map_err(|e| format!("loading {}: {e}", so.display()))?;
        Ok(Module { lib, running: std::sync::Mutex::new(()), _dir: dir })
    }

    /// [`Module::build`] for a test: `None`, said on stderr, where there is
    /// no C++ compiler to run; a compile error panics.
    pub fn build_or_skip(test: &str, prelude: &str, kernels: &[&Kernel]) -> Option<Module> {
        match Module::build(prelude, kernels) {
            Ok(m) => Some(m),
            Err(e) if e.starts_with("running") => {
                eprintln!("{test}: skipped: {e}");
                None
            }
            Err(e) => panic!("{test}: {e}"),
        }
    }

    /// The order the blocks of later launches run in.
    pub fn set_block_order(&self, order: BlockOrder) {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `build` defined `emu_set_forward` with this signature.
        let set: libloading::Symbol<unsafe extern "C" fn(i32)> = unsafe { self.lib.get(b"emu_set_forward") }.expect("every module defines emu_set_forward");
        // SAFETY: it sets a flag of the module's emulator, not during a launch.
        unsafe { set((order == BlockOrder::FirstFirst) as i32) }
    }

    /// Runs kernel `entry` on a grid of `(x, y)` blocks of `block` threads
    /// (no kernel takes dynamic shared memory).
    ///
    /// # Safety
    /// `params` must match the kernel's parameter list, and every pointer
    /// must cover what the kernel reads and writes through it.
    pub unsafe fn launch(&self, entry: &str, grid: (u32, u32), block: u32, params: &[Param]) -> Result<(), String> {
        type Launch = unsafe extern "C" fn(u32, u32, u32, *const *mut std::ffi::c_void) -> i32;
        let symbol = format!("emu_launch_{entry}");
        // SAFETY: `build` defined every `emu_launch_` entry with this signature.
        let f: libloading::Symbol<Launch> = unsafe { self.lib.get(symbol.as_bytes()) }.map_err(|e| format!("{symbol}: {e}"))?;
        let mut values: Vec<[u8; 8]> = params
            .iter()
            .map(|p| {
                let mut b = [0u8; 8];
                match *p {
                    Param::Ptr(a) => b = a.to_ne_bytes(),
                    Param::F32(x) => b[..4].copy_from_slice(&x.to_ne_bytes()),
                    Param::I32(x) => b[..4].copy_from_slice(&x.to_ne_bytes()),
                }
                b
            })
            .collect();
        let args: Vec<*mut std::ffi::c_void> = values.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the caller vouches for the parameters.
        match unsafe { f(grid.0, grid.1, block, args.as_ptr()) } {
            0 => Ok(()),
            -2 => Err(format!("{entry} deadlocked: some of a block's threads wait at a barrier the others never reach")),
            _ => Err(format!("{entry} trapped")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_types_come_from_the_source() {
        let k = Kernel { name: "k_1".into(), source: "extern \"C\" __global__ void __launch_bounds__(32) k_1(const u32* w, float beta, int S) {\n}\n".into() };
        assert_eq!(param_types(&k).unwrap(), ["const u32*", "float", "int"]);
    }
}
