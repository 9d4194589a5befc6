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

/// Runs a check script with `args`; it must succeed and print `ok_line`.
fn check(script: &str, args: &[&std::ffi::OsStr], ok_line: &str) {
    let o = Command::new("python3").arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(script)).args(args).output().expect("running python3");
    assert!(o.status.success() && stdout(&o).contains(ok_line), "{script} failed:\n{}\n{}", stdout(&o), stderr(&o));
}

/// The test build of the server and the model the checks run it on.
fn server_args() -> [std::ffi::OsString; 2] {
    [env!("CARGO_BIN_EXE_bitnet").into(), stories().into()]
}

#[test]
fn helm_chart_renders_valid_kubernetes_and_refuses_bad_values() {
    if !have_python_modules(&["helm_python", "kubernetes_validate"], "pip install helm-python-sdk kubernetes-validate") {
        return;
    }
    check("deploy/helm/check_chart.py", &[], "chart ok");
}

#[test]
fn prometheus_scrapes_the_server_and_the_dashboard_and_rules_hold() {
    if !have_command("prometheus", "apt-get install prometheus")
        || !have_command("promtool", "apt-get install prometheus")
        || !have_python_modules(&["yaml"], "pip install pyyaml")
    {
        return;
    }
    let args = server_args();
    check("deploy/monitoring/check_monitoring.py", &[args[0].as_os_str(), args[1].as_os_str()], "monitoring ok");
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
    let args = server_args();
    check("deploy/docker/check_container.py", &[args[0].as_os_str(), args[1].as_os_str()], "container ok");
}
