//! `bitnet autotune` end to end, with the database in a folder of the
//! test's own: a sweep fills it, `compile` and `run` use it (and say so),
//! the artifact records where its tiles came from, list / export / import /
//! clear work, and a damaged database is a warning, never a failure.

mod common;

use bitnet_frontends::arch::Activation;
use bitnet_ir::DType;
use common::*;

#[test]
fn a_sweep_feeds_compile_run_and_the_artifact() {
    let dir = tmp_dir("autotune");
    let cache = dir.join("cache");
    let model = dir.join("m.gguf");
    write_synth(&small_spec(DType::TQ2_0, Activation::Silu), &model);
    let m = model.to_str().unwrap();
    let ok = |args: &[&str]| {
        let o = bitnet_cached(&cache, args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        o
    };

    // A fresh database: the machine is calibrated once (the ISA and packing
    // of the ternary products), the rest is the heuristic's.
    let first = ok(&["compile", "-m", m, "--dump-after", "schedule", "-t", "1"]);
    assert!(stderr(&first).contains("calibrating the CPU kernels for 1 threads"), "{}", stderr(&first));
    let before = stdout(&first);
    assert!(before.contains("(calibrated)") && before.contains("(heuristic)") && !before.contains("(database)"), "{before}");
    let again = ok(&["compile", "-m", m, "--dump-after", "schedule", "-t", "1"]);
    assert!(!stderr(&again).contains("calibrating") && stdout(&again) == before, "{}", stderr(&again));
    let table = stdout(&ok(&["autotune", "-m", m, "--budget", "5s", "-t", "1"]));
    for want in ["ternary_matmul n=256 k=256", "ternary_matmul n=512 k=256", "ternary_matmul n=256 k=512", "matmul n=300 k=256 w=f16", "decode", "prefill", "×"]
    {
        assert!(table.contains(want), "the table lacks {want}:\n{table}");
    }
    assert!(!table.contains("wrong"), "{table}");
    let list = stdout(&ok(&["autotune", "list"]));
    assert!(list.contains("1 threads:") && list.contains("ternary_matmul n=256 k=512"), "{list}");

    let after = stdout(&ok(&["compile", "-m", m, "--dump-after", "schedule", "-t", "1"]));
    assert!(after.contains("(database)") && !after.contains("(heuristic)"), "{after}");
    let other = stdout(&ok(&["compile", "-m", m, "--dump-after", "schedule", "-t", "3"]));
    assert!(!other.contains("(database)"), "tiles are tuned per thread count: {other}");
    let no = stdout(&ok(&["compile", "-m", m, "--dump-after", "schedule", "-t", "1", "--no-tune"]));
    assert!(!no.contains("(database)"), "{no}");

    // The artifact records where its tiles came from.
    let bnx = dir.join("m.bnx");
    let c = ok(&["compile", "-m", m, "-o", bnx.to_str().unwrap(), "-t", "1"]);
    assert!(stderr(&c).contains("with tuned tiles"), "{}", stderr(&c));
    let inspect = stdout(&ok(&["inspect", bnx.to_str().unwrap()]));
    assert!(inspect.contains("database") && !inspect.contains("heuristic"), "{inspect}");
    let run = |model: &str, extra: &[&str]| {
        let mut args = vec!["run", "-m", model, "-p", "hello", "-n", "8", "--temp", "0", "--json", "-t", "1"];
        args.extend_from_slice(extra);
        let j: serde_json::Value = serde_json::from_str(&stdout(&ok(&args))).unwrap();
        j["generated_ids"].clone()
    };
    let tuned = run(m, &[]);
    assert_eq!(tuned, run(m, &["--no-tune"]), "tiles change speed, never results");
    assert_eq!(tuned, run(bnx.to_str().unwrap(), &[]));

    // Export, clear, import.
    let file = dir.join("export.jsonl");
    ok(&["autotune", "export", file.to_str().unwrap()]);
    assert!(stderr(&ok(&["autotune", "clear"])).contains("removed"));
    assert!(!stdout(&ok(&["compile", "-m", m, "--dump-after", "schedule", "-t", "1"])).contains("(database)"));
    ok(&["autotune", "import", file.to_str().unwrap()]);
    assert!(stdout(&ok(&["compile", "-m", m, "--dump-after", "schedule", "-t", "1"])).contains("(database)"));

    // `compile --tune quick` tunes what the database lacks, first: four
    // workloads (q, k and v side by side are 512 rows, as gate and up are).
    ok(&["autotune", "clear"]);
    let c = ok(&["compile", "-m", m, "-o", bnx.to_str().unwrap(), "-t", "1", "--tune", "quick"]);
    assert!(stderr(&c).contains("tuning 4 workloads") && !stderr(&c).contains("(0 with tuned tiles)"), "{}", stderr(&c));
    let c = ok(&["compile", "-m", m, "-o", bnx.to_str().unwrap(), "-t", "1", "--tune", "quick"]);
    assert!(stderr(&c).contains("has every workload"), "{}", stderr(&c));

    // A damaged database: warned about, and the defaults are used.
    let db = cache.join("tuning.jsonl");
    let text = std::fs::read_to_string(&db).unwrap();
    std::fs::write(&db, format!("{}\ngarbage\n", &text[..text.len() / 2])).unwrap();
    let o = ok(&["run", "-m", m, "-p", "hello", "-n", "4", "-t", "1"]);
    assert!(stderr(&o).contains("unreadable records skipped"), "{}", stderr(&o));
    std::fs::write(&db, "\u{0}\u{1}\u{2}").unwrap();
    let o = ok(&["run", "-m", m, "-p", "hello", "-n", "4", "-t", "1"]);
    assert!(stderr(&o).contains("not a bitnet tuning database"), "{}", stderr(&o));

    let bad = bitnet_cached(&cache, &["autotune", "-m", m, "--budget", "soon"]);
    assert!(!bad.status.success() && stderr(&bad).contains("not a duration"), "{}", stderr(&bad));
    let bad = bitnet_cached(&cache, &["autotune"]);
    assert!(!bad.status.success() && stderr(&bad).contains("--shapes 2b4t"), "{}", stderr(&bad));
    let bad = bitnet_cached(&cache, &["autotune", "--shapes", "7b"]);
    assert!(!bad.status.success() && stderr(&bad).contains("unknown shape set"), "{}", stderr(&bad));
    std::fs::remove_dir_all(dir).ok();
}
