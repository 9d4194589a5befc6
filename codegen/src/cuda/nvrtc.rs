//! Finding NVRTC and compiling CUDA C to PTX with it.
//!
//! cudarc loads NVRTC by name and panics when it cannot, so the library is
//! found here first, at a full path when need be: `BITNET_NVRTC_LIB`, the
//! loader's own search (`LD_LIBRARY_PATH`, the system folders), the CUDA
//! toolkit folders, then the folders of the pip wheels
//! `nvidia-cuda-nvrtc-cu12` and `nvidia-cuda-nvrtc` (CUDA 13) in the usual
//! Python environments. A library
//! loaded at a full path stays loaded, and the dynamic loader then answers
//! cudarc's load by its soname (`libnvrtc.so.12` or `.13`) with it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Architectures the PTX can target; sm_80 runs on Ampere and later.
pub const DEFAULT_SM: u32 = 80;

/// Where NVRTC was found, or every place it was looked for.
fn probe() -> &'static Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static KEEP: OnceLock<libloading::Library> = OnceLock::new();
    FOUND.get_or_init(|| {
        let mut tried = Vec::new();
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("BITNET_NVRTC_LIB") {
            candidates.push(PathBuf::from(p));
        } else {
            candidates.extend(["libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so"].map(PathBuf::from));
            candidates.extend(toolkit_dirs().into_iter().map(|d| d.join("lib64/libnvrtc.so")));
            candidates
                .extend(wheel_dirs().into_iter().flat_map(|d| [d.join("nvidia/cuda_nvrtc/lib/libnvrtc.so.12"), d.join("nvidia/cu13/lib/libnvrtc.so.13")]));
        }
        for c in candidates {
            let by_name = c.components().count() == 1;
            if !by_name && !c.exists() {
                tried.push(format!("{} (absent)", c.display()));
                continue;
            }
            // SAFETY: loading NVRTC runs its initializers, which have no
            // preconditions.
            match unsafe { libloading::Library::new(&c) } {
                Ok(lib) => {
                    let _ = KEEP.set(lib);
                    // cudarc opens the library by name; it must find this one.
                    // SAFETY: as above.
                    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                        return Err(format!("NVRTC loaded from {} but not under its soname libnvrtc.so.12; add its folder to LD_LIBRARY_PATH", c.display()));
                    }
                    return Ok(c);
                }
                Err(_) if by_name => tried.push(format!("{} (not on the library path)", c.display())),
                Err(e) => tried.push(format!("{}: {e}", c.display())),
            }
        }
        Err(format!(
            "NVRTC (libnvrtc.so, CUDA 12 or 13) was not found. Install it with `pip install nvidia-cuda-nvrtc-cu12` or the CUDA toolkit, \
             or point BITNET_NVRTC_LIB at the library. Looked for: {}",
            tried.join(", ")
        ))
    })
}

/// The NVRTC library in use, or why there is none.
pub fn library() -> Result<&'static Path, String> {
    probe().as_ref().map(|p| p.as_path()).map_err(Clone::clone)
}

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32), String> {
    library()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded (above) and both pointers are valid.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| format!("nvrtcVersion: {e:?}"))?;
    Ok((major, minor))
}

/// Compiles `source` to PTX for `compute_{sm}`. No GPU is needed.
pub fn compile(source: &str, sm: u32) -> Result<String, String> {
    library()?;
    let opts = cudarc::nvrtc::CompileOptions {
        fmad: Some(false),
        options: vec![format!("--gpu-architecture=compute_{sm}"), "--std=c++17".into()],
        name: Some("bitnet.cu".into()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(source, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => Err(format!("NVRTC rejected the generated CUDA C:\n{}", log.to_string_lossy())),
        Err(e) => Err(format!("NVRTC: {e:?}")),
    }
}

/// `ptxas`, the PTX assembler (CUDA toolkit or the pip wheel
/// `nvidia-cuda-nvcc-cu12`), for checking PTX without a GPU.
pub fn ptxas() -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join("ptxas")).collect()).unwrap_or_default();
    c.extend(toolkit_dirs().into_iter().map(|d| d.join("bin/ptxas")));
    c.extend(wheel_dirs().into_iter().map(|d| d.join("nvidia/cuda_nvcc/bin/ptxas")));
    c.into_iter().find(|p| p.is_file())
}

fn toolkit_dirs() -> Vec<PathBuf> {
    let mut d: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"].iter().filter_map(std::env::var_os).map(PathBuf::from).collect();
    d.push("/usr/local/cuda".into());
    d
}

/// The site-packages folders of the usual Python environments: the active
/// virtualenv or conda env, the user's, pyenv's, and the system's.
fn wheel_dirs() -> Vec<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"].iter().filter_map(std::env::var_os).map(PathBuf::from).collect();
    if let Some(h) = &home {
        prefixes.push(h.join(".local"));
        if let Ok(versions) = std::fs::read_dir(h.join(".pyenv/versions")) {
            prefixes.extend(versions.flatten().map(|e| e.path()));
        }
    }
    // The environment of each `python3` on the PATH (`<prefix>/bin/python3`).
    if let Some(path) = std::env::var_os("PATH") {
        prefixes.extend(std::env::split_paths(&path).filter(|d| d.join("python3").exists()).filter_map(|d| d.parent().map(Path::to_path_buf)));
    }
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    let mut out = Vec::new();
    for p in prefixes {
        let Ok(entries) = std::fs::read_dir(p.join("lib")) else { continue };
        let mut pythons: Vec<PathBuf> =
            entries.flatten().map(|e| e.path()).filter(|e| e.file_name().is_some_and(|n| n.to_string_lossy().starts_with("python3"))).collect();
        pythons.sort();
        for py in pythons {
            out.extend([py.join("site-packages"), py.join("dist-packages")].into_iter().filter(|d| d.is_dir()));
        }
    }
    out
}
