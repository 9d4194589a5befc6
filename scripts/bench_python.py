#!/usr/bin/env python3
"""Decode tokens/s of the Python bindings against the CLI on one model,
alternating runs, medians (the bindings' overhead is the ratio).

    python3 scripts/bench_python.py MODEL [-n 64] [-r 3] [-t 2] [--bin target/release/bitnet]

The Python side times `generate` for 1 token (the prompt's prefill and the
first token) and for 1 + N tokens on the same prompt; the difference is N
decode steps. The CLI side is `bitnet run --json`'s `decode_tok_s` for the
same prompt and 1 + N tokens. Needs the `bitnet` package installed
(`pip install ./python`).
"""

import argparse
import json
import statistics
import subprocess
import time

import bitnet

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("-n", type=int, default=64)
ap.add_argument("-r", type=int, default=3)
ap.add_argument("-t", type=int, default=2)
ap.add_argument("--bin", default="target/release/bitnet")
ap.add_argument("--prompt", default="Once upon a time")
ap.add_argument("--concurrent", type=int, default=0, help="also time this many Python threads generating at once on one model")
a = ap.parse_args()

py_rates, cli_rates = [], []
with bitnet.Model(a.model, threads=a.t, parallel=max(a.concurrent, 1)) as m:
    for rep in range(a.r):
        t0 = time.perf_counter()
        m.generate(a.prompt, max_tokens=1, temperature=0, ignore_eos=True)
        t1 = time.perf_counter()
        m.generate(a.prompt, max_tokens=a.n + 1, temperature=0, ignore_eos=True)
        t2 = time.perf_counter()
        py = a.n / ((t2 - t1) - (t1 - t0))
        out = subprocess.run(
            [a.bin, "run", "-m", a.model, "-p", a.prompt, "-n", str(a.n + 1), "--temp", "0", "--ignore-eos", "-t", str(a.t), "--json"],
            capture_output=True, text=True, check=True,
        )
        cli = json.loads(out.stdout)["decode_tok_s"]
        py_rates.append(py)
        cli_rates.append(cli)
        print(f"run {rep + 1}/{a.r}: python {py:.2f} tok/s, cli {cli:.2f} tok/s", flush=True)
    together = []
    if a.concurrent:
        import threading

        prompts = [f"{a.prompt} {i}" for i in range(a.concurrent)]
        for rep in range(a.r):
            # Tokens of every thread over the wall time, prefill included.
            threads = [threading.Thread(target=m.generate, args=(p,), kwargs={"max_tokens": a.n, "temperature": 0, "ignore_eos": True}) for p in prompts]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            t0 = time.perf_counter()
            m.generate(prompts[0], max_tokens=a.n, temperature=0, ignore_eos=True)
            one = a.n / (time.perf_counter() - t0)
            together.append((a.concurrent * a.n / wall, one))
            print(f"run {rep + 1}/{a.r}: {a.concurrent} threads {together[-1][0]:.2f} tok/s in all, one thread {one:.2f} tok/s", flush=True)
p, c = statistics.median(py_rates), statistics.median(cli_rates)
report = {"python_decode_tok_s": round(p, 2), "cli_decode_tok_s": round(c, 2), "ratio": round(p / c, 3), "n": a.n, "runs": a.r}
if together:
    report["concurrent"] = a.concurrent
    report["concurrent_tok_s"] = round(statistics.median(x for x, _ in together), 2)
    report["one_thread_tok_s"] = round(statistics.median(y for _, y in together), 2)
print(json.dumps(report))
