//! bitnet-autotune: per-machine tile search and the tuning database.
//!
//! Empty until the CPU compiler exposes tile knobs for it to search; the
//! crate exists now so that the dependency direction (runtime → autotune →
//! codegen) is fixed from the start.
