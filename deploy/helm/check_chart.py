#!/usr/bin/env python3
"""Checks the Helm chart offline, with Helm's own library and the Kubernetes
schemas: lint, render with the default values (no value is required) and
with the other shapes users choose, validate every manifest strictly
against Kubernetes 1.25-1.37, check what the server needs (the probes on
/health, the model path, the metrics port), and make sure bad values fail.

    pip install helm-python-sdk kubernetes-validate
    python3 deploy/helm/check_chart.py [CHART]

Exits non-zero with the first thing that is wrong.
"""
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checklib import failer  # noqa: E402

import helm_python as helm
import kubernetes_validate
import yaml

CHART = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "bitnet")
VERSIONS = ["1.25", "1.30", "1.37"]
# The server's unauthenticated endpoints (server/src/openapi.rs, PUBLIC).
HEALTH, METRICS = "/health", "/metrics"


fail = failer("chart")


def render(values):
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        out = chart.render(values, name="demo", namespace="serving")
    docs = []
    for name, text in sorted(out.items()):
        if not name.endswith(".yaml"):
            fail(f"{name}: every template file ends in .yaml")
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def kinds(docs):
    return {d["kind"]: d for d in docs}


def validate(docs, label):
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            # A CRD: no schema ships with Kubernetes; checked by hand below.
            continue
        for v in VERSIONS:
            try:
                kubernetes_validate.validate(d, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{label}: {d['kind']} is not valid Kubernetes {v}: {e.message} at {list(e.path)}")
            except kubernetes_validate.SchemaNotFoundError:
                fail(f"{label}: Kubernetes {v} has no {d['apiVersion']} {d['kind']}")


def container(docs):
    return kinds(docs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def check_server_contract(docs, label):
    c = container(docs)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = c[probe]["httpGet"]["path"]
        if path != HEALTH:
            fail(f"{label}: {probe} asks {path}, but the server's health endpoint is {HEALTH}")
    args = c["args"]
    if args[0] != "serve" or "--model" not in args or not args[args.index("--model") + 1].startswith("/models/"):
        fail(f"{label}: the container does not run `bitnet serve --model /models/...`: {args}")
    if args[args.index("--host") + 1] != "0.0.0.0":
        fail(f"{label}: the server must listen on 0.0.0.0 in a pod")
    port = int(args[args.index("--port") + 1])
    if c["ports"][0]["containerPort"] != port:
        fail(f"{label}: the container port {c['ports'][0]['containerPort']} is not the server's --port {port}")
    svc = kinds(docs)["Service"]
    if svc["spec"]["ports"][0]["targetPort"] != c["ports"][0]["name"]:
        fail(f"{label}: the Service does not target the container's port")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    if "/models" not in mounts:
        fail(f"{label}: nothing is mounted at /models")


def main():
    lint = helm.lint(str(CHART))
    if lint["errors"] or any(m["severity"] >= 3 for m in lint["messages"]):
        fail(f"helm lint: {lint}")

    defaults = render({})
    want = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim"}
    if set(kinds(defaults)) != want:
        fail(f"the default values render {sorted(kinds(defaults))}, not {sorted(want)}")
    validate(defaults, "defaults")
    check_server_contract(defaults, "defaults")

    shapes = {
        "fetched model": {"model": {"fetch": {"url": "https://example.com/model.gguf"}}},
        "existing claim": {"model": {"existingClaim": "models", "persistence": {"create": False}}},
        "api key, fixed replicas": {"server": {"apiKeySecret": {"name": "bitnet-key"}, "ctxSize": 4096, "threads": 2, "timeout": 600,
                                               "alias": "bitnet-2b", "chatTemplate": "bitnet", "extraArgs": ["--head", "q8"]},
                                    "autoscaling": {"enabled": False}, "replicaCount": 3, "podDisruptionBudget": {"enabled": False}},
        "service monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    }
    for label, values in shapes.items():
        docs = render(values)
        validate(docs, label)
        check_server_contract(docs, label)
    k = kinds(render(shapes["fetched model"]))
    if "PersistentVolumeClaim" in k or not k["Deployment"]["spec"]["template"]["spec"].get("initContainers"):
        fail("a fetched model gets an init container and no claim")
    k = kinds(render(shapes["api key, fixed replicas"]))
    if k["Deployment"]["spec"].get("replicas") != 3 or "HorizontalPodAutoscaler" in k or "PodDisruptionBudget" in k:
        fail("without autoscaling the Deployment has replicaCount replicas and no autoscaler")
    if "--api-key-file" not in container(list(k.values()))["args"]:
        fail("an API key secret becomes --api-key-file")
    sm = kinds(render(shapes["service monitor"])).get("ServiceMonitor")
    if not sm or sm["spec"]["endpoints"][0]["path"] != METRICS or sm["spec"]["endpoints"][0]["port"] != "http":
        fail(f"the ServiceMonitor scrapes {METRICS} on the http port: {sm}")

    bad = {
        "a port that is not a number": {"server": {"port": "eighty"}},
        "a port out of range": {"server": {"port": 70000}},
        "no sequences": {"server": {"parallel": 0}},
        "a CPU target over 100%": {"autoscaling": {"targetCPUUtilizationPercentage": 150}},
        "a misspelt key": {"sever": {"port": 8080}},
        "an unknown pull policy": {"image": {"pullPolicy": "Sometimes"}},
        "no model source": {"model": {"persistence": {"create": False}}},
    }
    for label, values in bad.items():
        try:
            render(values)
        except helm.HelmError as e:
            print(f"refused as it should be: {label}: {' '.join(str(e).split())[:150]}")
            continue
        fail(f"{label} ({values}) rendered without an error")
    print(f"chart ok: {CHART} lints, renders {len(shapes) + 1} value sets valid for Kubernetes {', '.join(VERSIONS)}, refuses {len(bad)} bad ones")


if __name__ == "__main__":
    main()
