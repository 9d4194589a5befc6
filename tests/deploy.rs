//! The deployment files, checked with the real tools: the Helm chart
//! (`deploy/helm`) linted, rendered and validated offline by Helm's own
//! library and the Kubernetes schemas, the monitoring files
//! (`deploy/monitoring`) against a live `bitnet serve` scraped by a real
//! Prometheus, and the `Dockerfile`'s image built and run on a real Docker
//! daemon. Without the tools these tests skip with a message (`.ci/run`
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

#[test]
fn container_image_builds_becomes_healthy_serves_and_stops_on_sigterm() {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| stdout(&o).trim() == "0");
    if !have(root, "root (the test starts its own Docker daemon)", "run the tests as root")
        || !have_command("dockerd", "apt-get install docker.io")
        || !have_command("debootstrap", "apt-get install debootstrap")
    {
        return;
    }
    let o = Command::new("python3")
        .arg(script("deploy/docker/check_container.py"))
        .arg(env!("CARGO_BIN_EXE_bitnet"))
        .arg(stories())
        .output()
        .expect("running python3");
    assert!(o.status.success(), "the container check failed:\n{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("container ok"), "{}", stdout(&o));
}
