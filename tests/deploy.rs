//! The deployment files, checked with the real tools: the Helm chart
//! (`deploy/helm`) linted, rendered and validated offline by Helm's own
//! library and the Kubernetes schemas, and the monitoring files
//! (`deploy/monitoring`) against a live `bitnet serve` scraped by a real
//! Prometheus. Without the tools these tests skip with a message (`.ci/run`
//! installs them and requires them).

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn script(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn helm_chart_renders_valid_kubernetes_and_refuses_bad_values() {
    if !have_python_modules(&["helm_python", "kubernetes_validate"], "pip install helm-python-sdk kubernetes-validate") {
        return;
    }
    let o = Command::new("python3").arg(script("deploy/helm/check_chart.py")).output().expect("running python3");
    assert!(o.status.success(), "the chart check failed:\n{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("chart ok"), "{}", stdout(&o));
}

#[test]
fn prometheus_scrapes_the_server_and_the_dashboard_and_rules_hold() {
    if !have_command("prometheus", "apt-get install prometheus") || !have_command("promtool", "apt-get install prometheus") || !have_python_modules(&["yaml"], "pip install pyyaml") {
        return;
    }
    let o = Command::new("python3")
        .arg(script("deploy/monitoring/check_monitoring.py"))
        .arg(env!("CARGO_BIN_EXE_bitnet"))
        .arg(stories())
        .output()
        .expect("running python3");
    assert!(o.status.success(), "the monitoring check failed:\n{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("monitoring ok"), "{}", stdout(&o));
}
