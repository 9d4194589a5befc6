//! The machine code is generated for, detected when the program runs.

use std::fmt;

/// What the host CPU offers, detected when the program runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCpu {
    pub arch: &'static str,
    pub model: String,
    pub cores: usize,
    /// ISA extensions that matter to int8 and ternary kernels.
    pub features: Vec<&'static str>,
    /// Data and unified cache sizes, innermost first (e.g. `L1d 32K`).
    pub caches: Vec<String>,
}

impl HostCpu {
    pub fn detect() -> HostCpu {
        HostCpu {
            arch: std::env::consts::ARCH,
            model: cpu_model().unwrap_or_else(|| "unknown".into()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            features: features(),
            caches: caches(),
        }
    }

    /// A short stable name for this CPU's tuning-relevant facts: equal
    /// fingerprints, interchangeable tiles and artifacts.
    pub fn fingerprint(&self) -> String {
        let text = format!("{}|{}|{}|{}|{}", self.arch, self.model, self.cores, self.features.join(","), self.caches.join(","));
        format!("cpu-{:016x}", fnv1a(text.as_bytes()))
    }
}

/// FNV-1a, 64-bit: a hash that stays the same across builds and releases.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

fn caches() -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok().map(|s| s.trim().to_string());
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size")) else { break };
        match kind.as_str() {
            "Data" => out.push(format!("L{level}d {size}")),
            "Unified" => out.push(format!("L{level} {size}")),
            _ => {}
        }
    }
    out
}

impl fmt::Display for HostCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {} threads available): {}", self.model, self.arch, self.cores, self.features.join(" "))?;
        if !self.caches.is_empty() {
            write!(f, "; caches {}", self.caches.join(", "))?;
        }
        Ok(())
    }
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string())
}

#[cfg(target_arch = "x86_64")]
fn features() -> Vec<&'static str> {
    let mut f = Vec::new();
    macro_rules! probe {
        ($($name:tt),*) => { $( if std::is_x86_feature_detected!($name) { f.push($name); } )* };
    }
    probe!("sse4.1", "ssse3", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni");
    f
}

#[cfg(target_arch = "aarch64")]
fn features() -> Vec<&'static str> {
    let mut f = Vec::new();
    macro_rules! probe {
        ($($name:tt),*) => { $( if std::arch::is_aarch64_feature_detected!($name) { f.push($name); } )* };
    }
    probe!("neon", "dotprod", "i8mm", "fp16");
    f
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn features() -> Vec<&'static str> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    #[test]
    fn detection_is_stable() {
        assert_eq!(super::HostCpu::detect(), super::HostCpu::detect());
        assert_eq!(super::HostCpu::detect().fingerprint(), super::HostCpu::detect().fingerprint());
    }

    #[test]
    fn fnv1a_is_the_published_function() {
        assert_eq!(super::fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(super::fnv1a(b"a"), 0xaf63dc4c8601ec8c);
    }
}
