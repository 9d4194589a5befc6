#!/usr/bin/env python3
"""Checks the monitoring files against a live server and a real Prometheus:
`promtool` checks the rules and the config; then `bitnet serve` runs on
MODEL, Prometheus scrapes it every second with the alert rules loaded, some
requests go through (completions and a bad one), and Prometheus's HTTP API
must show every series the dashboard and the rules use, the counters moved,
every dashboard query and rule expression evaluates, and every rule is
healthy.

    python3 deploy/monitoring/check_monitoring.py BITNET_BINARY MODEL

Needs `prometheus` and `promtool` (Debian's prometheus package). Exits
non-zero with the first thing that is wrong.
"""
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checklib import failer, free_port, http  # noqa: E402

fail = failer("monitoring")

HERE = Path(__file__).resolve().parent
RULES, CONFIG, DASHBOARD = HERE / "alerts.yml", HERE / "prometheus.yml", HERE / "grafana-dashboard.json"


def wait(what, cond, seconds=60):
    end = time.time() + seconds
    while time.time() < end:
        if cond():
            return
        time.sleep(0.25)
    fail(f"timed out waiting for {what}")


def query(prom, expr):
    status, body = http(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    if status != 200:
        fail(f"Prometheus refused the query {expr!r}: {status} {body[:300]!r}")
    return json.loads(body)["data"]["result"]


def dashboard_exprs():
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
    # Grafana's variables, as Grafana would fill them in for "all instances".
    return [e.replace("$__rate_interval", "1m").replace("$instance", ".*") for e in exprs]


def rule_exprs():
    import yaml  # PyYAML: only for reading the rules back

    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r["expr"].strip() for g in groups for r in g["rules"]}


def main():
    if len(sys.argv) != 3:
        fail("usage: check_monitoring.py BITNET_BINARY MODEL")
    binary, model = sys.argv[1], sys.argv[2]
    for args in (["check", "rules", str(RULES)], ["check", "config", str(CONFIG)]):
        r = subprocess.run(["promtool", *args], capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}")

    tmp = Path(tempfile.mkdtemp(prefix="bitnet-monitoring-"))
    port, prom_port = free_port(), free_port()
    server = subprocess.Popen(
        [binary, "serve", "-m", model, "--port", str(port), "--chat-template", "chatml", "-t", "1", "--parallel", "2", "--max-queue", "8"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "w"))
    (tmp / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {RULES}\n"
        f"scrape_configs:\n  - job_name: bitnet\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "w"))
    base, prom_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
    try:
        wait("the server to load the model", lambda: http(f"{base}/health")[0] == 200)
        wait("Prometheus to answer", lambda: http(f"{prom_url}/-/ready")[0] == 200)
        wait("Prometheus to scrape the server", lambda: any(r["value"][1] == "1" for r in query(prom_url, 'up{job="bitnet"}')))

        def generated():
            r = query(prom_url, "bitnet_generated_tokens_total")
            return float(r[0]["value"][1]) if r else None

        before = generated()
        if before is None:
            fail("bitnet_generated_tokens_total is not scraped")
        for i in range(6):
            status, body = http(f"{base}/v1/chat/completions",
                                {"messages": [{"role": "user", "content": f"Tell story {i}"}], "max_tokens": 12, "temperature": 0})
            if status != 200:
                fail(f"a chat completion failed: {status} {body[:300]!r}")
        if http(f"{base}/v1/chat/completions", b"{not json")[0] != 400:
            fail("a malformed request was not a 400")
        wait("the counters to move in Prometheus", lambda: (generated() or 0) >= before + 6 * 12, seconds=30)
        time.sleep(2.5)  # a few more scrapes and rule evaluations

        exprs = dashboard_exprs()
        rules = rule_exprs()
        names = sorted({n for e in exprs + list(rules.values()) for n in re.findall(r"\bbitnet_[a-z_]+", e)})
        for name in names:
            if not query(prom_url, f'{{__name__="{name}"}}'):
                fail(f"{name}, which the dashboard or the rules use, is not among the scraped series")
        for expr in exprs:
            # Every panel has data after this load, but the 5xx ratio (there were none).
            if not query(prom_url, expr) and '"5.."' not in expr:
                fail(f"the dashboard query {expr!r} has no data after the load")
        for alert, expr in rules.items():
            query(prom_url, expr)  # evaluates without an error
        status, body = http(f"{prom_url}/api/v1/rules")
        loaded = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
        if sorted(r["name"] for r in loaded) != sorted(rules):
            fail(f"Prometheus loaded the rules {[r['name'] for r in loaded]}, not {sorted(rules)}")
        unhealthy = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
        if unhealthy:
            fail(f"rules that do not evaluate: {unhealthy}")
        if not query(prom_url, 'bitnet_requests_total{endpoint="/v1/chat/completions",status="400"}'):
            fail("the bad request is not counted under status 400")
        ttft = query(prom_url, "bitnet_time_to_first_token_seconds_count")
        if not ttft or float(ttft[0]["value"][1]) < 6:
            fail(f"time to first token was not observed for the 6 requests: {ttft}")
        print(f"monitoring ok: {len(names)} series, {len(exprs)} dashboard queries and {len(rules)} healthy rules on a live server "
              f"({generated() - before:.0f} tokens generated while Prometheus watched)")
    finally:
        for p in (prom, server):
            p.terminate()
        for p in (prom, server):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
