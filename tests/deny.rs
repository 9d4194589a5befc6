//! The dependency policy (`deny.toml`): every crate in the build under an
//! allowed licence, from crates.io only, no wildcard versions. `cargo deny
//! check advisories` needs the network for its database: run it by hand.

mod common;

use common::*;
use std::process::Command;

#[test]
fn dependencies_have_allowed_licences_and_sources() {
    if !have_command("cargo-deny", "cargo install cargo-deny --locked") {
        return;
    }
    // cargo deny reads the metadata of every platform's crates (windows-sys
    // too), which a build here never downloads: fetch them first (from
    // crates.io; a no-op once they are in the cargo cache).
    let fetch = Command::new("cargo").args(["fetch", "--locked"]).current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("running cargo fetch");
    assert!(fetch.status.success(), "cargo fetch failed:\n{}", stderr(&fetch));
    let o = Command::new("cargo")
        .args(["deny", "--offline", "check", "licenses", "bans", "sources"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo deny");
    assert!(o.status.success(), "cargo deny found a problem:\n{}", stderr(&o));
}
