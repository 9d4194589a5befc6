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
}

impl HostCpu {
    pub fn detect() -> HostCpu {
        HostCpu {
            arch: std::env::consts::ARCH,
            model: cpu_model().unwrap_or_else(|| "unknown".into()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            features: features(),
        }
    }
}

impl fmt::Display for HostCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {} threads available): {}", self.model, self.arch, self.cores, self.features.join(" "))
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
    }
}
