//! The documentation cannot drift from the binary: every shell block marked
//! `sh runnable` in the README and in `docs/*.md` runs here, each file's
//! blocks in order in one scratch folder (so a block may use what an
//! earlier one made), with `./target/release/bitnet` and `bitnet` on the
//! `PATH` being this test build, `testdata/` the repository's, and `cargo
//! build` already done. A block fails the test when it exits non-zero.
//! The blocks call `curl` and `python3` besides `bitnet`: a file whose
//! blocks need one that is missing is skipped with a message.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `sh runnable` blocks of one Markdown file, with their first lines.
fn runnable_blocks(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match &mut open {
            Some((_, body)) if !fence => {
                body.push_str(line);
                body.push('\n');
            }
            Some(_) => blocks.push(open.take().unwrap()),
            None if fence && line.trim_start().trim_start_matches('`').trim() == "sh runnable" => open = Some((i + 1, String::new())),
            None => {}
        }
    }
    blocks
}

/// A scratch folder that looks like a checkout after `cargo build --release`.
fn scratch(name: &str) -> TmpDir {
    let dir = tmp_dir(&format!("docs-{name}"));
    let bin = dir.join(".bin");
    std::fs::create_dir_all(dir.join("target/release")).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_bitnet"));
    for link in [dir.join("target/release/bitnet"), bin.join("bitnet")] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(exe, link).unwrap();
    }
    let _ = std::fs::remove_file(dir.join("testdata"));
    std::os::unix::fs::symlink(root().join("testdata"), dir.join("testdata")).unwrap();
    let shim = "#!/bin/sh\n# The docs test's cargo: the build is done; anything else is not run here.\n\
                [ \"$1\" = build ] && exit 0\necho \"cargo $*: not run by the docs test\" >&2\nexit 1\n";
    std::fs::write(bin.join("cargo"), shim).unwrap();
    Command::new("chmod").arg("+x").arg(bin.join("cargo")).status().unwrap();
    dir
}

#[test]
fn runnable_shell_blocks_in_the_docs_run() {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> =
        std::fs::read_dir(root().join("docs")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "md")).collect();
    docs.sort();
    files.extend(docs);
    let (mut ran, mut skipped) = (0, 0);
    for file in files {
        let blocks = runnable_blocks(&std::fs::read_to_string(&file).unwrap());
        if blocks.is_empty() {
            continue;
        }
        // A file's blocks build on each other: without a tool one of them
        // calls, the file is skipped whole (and fails under BITNET_REQUIRE_TOOLS).
        let missing = |tool: &str, install: &str| blocks.iter().any(|(_, b)| calls(b, tool)) && !have_command(tool, install);
        if missing("curl", "apt-get install curl") || missing("python3", "apt-get install python3") {
            eprintln!("skipped: the runnable blocks of {}", file.display());
            skipped += blocks.len();
            continue;
        }
        let name = file.file_stem().unwrap().to_string_lossy().to_string();
        let dir = scratch(&name);
        let path = format!("{}:{}", dir.join(".bin").display(), std::env::var("PATH").unwrap_or_default());
        for (line, body) in blocks {
            let o = Command::new("timeout")
                .args(["300", "bash", "-euo", "pipefail", "-c", &body])
                .current_dir(&dir)
                .env("PATH", &path)
                .output()
                .expect("running bash");
            assert!(
                o.status.success(),
                "{}:{line}: the block failed ({}):\n{body}\nstdout:\n{}\nstderr:\n{}",
                file.display(),
                o.status,
                stdout(&o),
                stderr(&o)
            );
            ran += 1;
        }
    }
    // The markers are the point: losing them would pass silently.
    assert!(ran + skipped >= 7, "only {} runnable blocks found in the README and docs/", ran + skipped);
}

/// True when a shell block runs `tool` as a command.
fn calls(block: &str, tool: &str) -> bool {
    block.split(|c: char| c.is_whitespace() || matches!(c, '|' | ';' | '&' | '(' | '$')).any(|word| word == tool)
}

#[test]
fn tools_a_block_calls_are_found() {
    assert!(calls("curl -s localhost:8080/health | grep ok > /dev/null", "curl"));
    assert!(calls("x=$(python3 -c 'print(1)')", "python3"));
    assert!(!calls("echo curling; cat python3.txt", "curl"));
    assert!(!calls("echo curling; cat python3.txt", "python3"));
}

#[test]
fn blocks_are_found_as_marked() {
    let md = "text\n```sh runnable\necho a\necho b\n```\n```sh\nnot this\n```\n  ```sh runnable\necho c\n  ```\n";
    assert_eq!(runnable_blocks(md), vec![(2, "echo a\necho b\n".to_string()), (9, "echo c\n".to_string())]);
}

/// `cmd | grep -q` fails at random under `pipefail`: grep exits at the first
/// match, and the command's next write gets EPIPE (curl exits 23, a Rust
/// binary 101). CI failed once on exactly this; `grep PATTERN > /dev/null`
/// reads everything.
#[test]
fn runnable_blocks_never_pipe_into_grep_q() {
    let mut files = vec![root().join("README.md")];
    files.extend(std::fs::read_dir(root().join("docs")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "md")));
    for file in files {
        for (line, body) in runnable_blocks(&std::fs::read_to_string(&file).unwrap()) {
            assert!(!body.contains("| grep -q"), "{}:{line}: a runnable block pipes into `grep -q`; write `| grep PATTERN > /dev/null`", file.display());
        }
    }
}
