#!/usr/bin/env python3
"""Wall-clock performance against the baselines kept in perf/wallclock.json,
keyed by machine fingerprint (CPU model, the ISA features the kernels use,
cores) and configuration. For people on quiet machines: CI tracks
instruction counts instead (tests/instruction_counts.rs), which noise does
not move.

    scripts/bench_compare.py MODEL [--bitnet target/release/bitnet] [-t 2] [-r 5] [--parallel 8] [--save] [--tolerance 0.05]

Runs `bitnet bench --json` and prints each figure beside its baseline;
exits 1 when one is slower by more than the tolerance. `--save` records the
run as this machine's baseline.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ROOT / "perf" / "wallclock.json"
FIGURES = ["prefill_tok_s", "decode_tok_s", "aggregate_decode_tok_s"]


def fingerprint():
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "unknown CPU")
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni") if f in flags]
    desc = f"{model}, {os.cpu_count()} cores, {' '.join(isa)}"
    return hashlib.sha256(desc.encode()).hexdigest()[:12], desc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--bitnet", default=str(ROOT / "target" / "release" / "bitnet"))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("--parallel", type=int)
    ap.add_argument("--save", action="store_true", help="record this run as the baseline")
    ap.add_argument("--tolerance", type=float, default=0.05, help="allowed slowdown, as a fraction (default 0.05)")
    a = ap.parse_args()

    cmd = [a.bitnet, "bench", "-m", a.model, "--json", "-t", str(a.threads), "-r", str(a.repetitions), "-p", str(a.n_prompt), "-n", str(a.n_gen)]
    if a.parallel:
        cmd += ["--parallel", str(a.parallel)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"bitnet bench failed:\n{run.stderr}")
    report = json.loads(run.stdout.strip().splitlines()[-1])
    fp, desc = fingerprint()
    key = f"{Path(a.model).name} -t {a.threads} -p {a.n_prompt} -n {a.n_gen}" + (f" --parallel {a.parallel}" if a.parallel else "") + f" isa {report.get('isa', '?')}"
    now = {f: report[f] for f in FIGURES if report.get(f) is not None}
    all_ = json.loads(BASELINES.read_text()) if BASELINES.exists() else {}
    machine = all_.setdefault(fp, {"machine": desc, "runs": {}})
    if a.save:
        machine["runs"][key] = now
        BASELINES.parent.mkdir(exist_ok=True)
        BASELINES.write_text(json.dumps(all_, indent=2, sort_keys=True) + "\n")
        print(f"saved the baseline of {key} on {desc} ({fp}): {now}")
        return
    base = machine["runs"].get(key)
    if not base:
        sys.exit(f"no baseline for {key} on {desc} ({fp}); record one with --save")
    slower = []
    print(f"{key} on {desc} ({fp}), median of {a.repetitions}:")
    for f, v in now.items():
        if f not in base:
            continue
        change = v / base[f] - 1.0
        print(f"  {f:<24} {base[f]:9.2f} -> {v:9.2f}  ({100 * change:+.1f}%)")
        if change < -a.tolerance:
            slower.append(f"{f} {100 * change:+.1f}%")
    if slower:
        sys.exit(f"slower than the baseline by more than {100 * a.tolerance:.0f}%: {', '.join(slower)}")
    print("within the tolerance")


if __name__ == "__main__":
    main()
