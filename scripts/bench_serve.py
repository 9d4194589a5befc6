#!/usr/bin/env python3
"""Load generator for an OpenAI-compatible server (`bitnet serve`, or
llama.cpp's `llama-server` for comparison).

C concurrent clients each send R streamed `/v1/completions` requests one
after another; each request's prompt is P random token ids (distinct per
request, unless --shared-prefix), and it asks for N tokens with
`ignore_eos`, so every request generates exactly N (times K with
`--choices K`, OpenAI's `n`: the choices share the prompt's KV blocks,
and the inter-token gaps are then between any two chunks). Reports, for each
concurrency level: aggregate generated tokens/s (all tokens over the
wall time), time to first token (TTFT) and inter-token latency (ITL)
percentiles, as a table, or as JSON lines with --json.

    python3 scripts/bench_serve.py http://127.0.0.1:8080 -c 1,4,8,16 -r 4 -p 128 -n 64

Python's standard library only (a small HTTP/1.1 client on asyncio).
"""

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.parse


class HttpError(Exception):
    pass


async def request(url, method, path, body=None, headers=None):
    """One HTTP/1.1 request on its own connection; returns (status, async
    iterator over the body's lines)."""
    u = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
    data = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", f"Host: {u.netloc}", "Connection: close", f"Content-Length: {len(data)}"]
    if body is not None:
        head.append("Content-Type: application/json")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    await writer.drain()
    status_line = await reader.readline()
    parts = status_line.decode(errors="replace").split()
    if len(parts) < 2 or not parts[1].isdigit():
        writer.close()
        raise HttpError(f"bad status line {status_line!r}")
    status = int(parts[1])
    chunked = False
    while True:
        line = (await reader.readline()).decode(errors="replace").strip()
        if not line:
            break
        k, _, v = line.partition(":")
        if k.strip().lower() == "transfer-encoding" and "chunked" in v.lower():
            chunked = True

    async def body_bytes():
        try:
            if not chunked:
                while True:
                    b = await reader.read(65536)
                    if not b:
                        return
                    yield b
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    return
                yield await reader.readexactly(size)
                await reader.readexactly(2)
        finally:
            writer.close()

    async def lines():
        buf = b""
        async for b in body_bytes():
            buf += b
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield line.rstrip(b"\r").decode(errors="replace")
        if buf:
            yield buf.decode(errors="replace")

    return status, lines()


async def get_json(url, path, headers=None):
    status, lines = await request(url, "GET", path, headers=headers)
    text = "\n".join([line async for line in lines])
    return status, (json.loads(text) if status == 200 else text)


def percentile(values, q):
    """The q-th percentile (0-100) by linear interpolation; None if empty."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


async def one_request(url, headers, prompt, max_tokens, choices):
    """Streams one completion; returns (ttft, inter-token gaps, tokens) in seconds."""
    body = {
        "prompt": prompt,
        "n": choices,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    arrivals = []
    usage_tokens = None
    status, lines = await request(url, "POST", "/v1/completions", body, headers)
    if status != 200:
        text = "\n".join([line async for line in lines])
        raise HttpError(f"status {status}: {text[:300]}")
    async for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise HttpError(chunk["error"].get("message"))
        if chunk.get("usage"):
            usage_tokens = chunk["usage"].get("completion_tokens")
        for c in chunk.get("choices") or []:
            if c.get("text"):
                arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError("the stream carried no text")
    tokens = usage_tokens if usage_tokens is not None else len(arrivals)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return arrivals[0] - t0, gaps, tokens


async def run_level(args, clients, vocab, rng):
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prefix = [rng.randrange(args.first_id, vocab) for _ in range(args.shared_prefix)]

    def prompt():
        rest = args.prompt_tokens - len(prefix)
        return prefix + [rng.randrange(args.first_id, vocab) for _ in range(max(rest, 1))]

    prompts = [[prompt() for _ in range(args.requests)] for _ in range(clients)]
    ttfts, gaps, tokens, failures = [], [], 0, []

    async def worker(mine):
        nonlocal tokens
        for p in mine:
            try:
                t, g, n = await asyncio.wait_for(one_request(args.url, headers, p, args.max_tokens, args.choices), args.timeout)
            except (OSError, HttpError, ValueError, asyncio.TimeoutError) as e:
                failures.append(f"{type(e).__name__}: {e}")
                continue
            ttfts.append(t)
            gaps.extend(g)
            tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(m) for m in prompts))
    wall = time.perf_counter() - t0
    ms = lambda x: None if x is None else round(x * 1e3, 1)  # noqa: E731
    return {
        "clients": clients,
        "requests": clients * args.requests,
        "completed": len(ttfts),
        "failed": len(failures),
        "first_failure": failures[0] if failures else None,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "choices": args.choices,
        "generated_tokens": tokens,
        "wall_s": round(wall, 3),
        "aggregate_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_ms_p50": ms(percentile(ttfts, 50)),
        "ttft_ms_p99": ms(percentile(ttfts, 99)),
        "itl_ms_p50": ms(percentile(gaps, 50)),
        "itl_ms_p99": ms(percentile(gaps, 99)),
        "itl_ms_mean": ms(statistics.fmean(gaps)) if gaps else None,
    }


async def vocab_size(args):
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    deadline = time.monotonic() + args.wait
    while True:
        try:
            status, _ = await get_json(args.url, "/health")
            if status == 200:
                break
        except (OSError, HttpError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"error: {args.url}/health did not answer 200 within {args.wait} s")
        await asyncio.sleep(0.5)
    status, models = await get_json(args.url, "/v1/models", headers)
    if status != 200:
        raise SystemExit(f"error: /v1/models answered {status}: {models}")
    if args.vocab:
        return args.vocab
    meta = models["data"][0].get("meta") or {}
    if "n_vocab" not in meta:
        raise SystemExit("error: the server does not report n_vocab in /v1/models; pass --vocab")
    return meta["n_vocab"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="the server, e.g. http://127.0.0.1:8080")
    ap.add_argument("-c", "--clients", default="1,4,8", help="concurrency levels, comma-separated [1,4,8]")
    ap.add_argument("-r", "--requests", type=int, default=4, help="requests per client [4]")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=128, help="prompt length in tokens [128]")
    ap.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens generated per request [64]")
    ap.add_argument("--choices", type=int, default=1, help="choices per request (OpenAI's n) [1]")
    ap.add_argument("--shared-prefix", type=int, default=0, help="leading prompt tokens all requests share [0]")
    ap.add_argument("--first-id", type=int, default=16, help="smallest token id in random prompts (skips special tokens) [16]")
    ap.add_argument("--vocab", type=int, help="vocabulary size [from /v1/models]")
    ap.add_argument("--api-key")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request [600]")
    ap.add_argument("--wait", type=float, default=120, help="seconds to wait for /health [120]")
    ap.add_argument("--json", action="store_true", help="one JSON object per level instead of the table")
    args = ap.parse_args()
    args.url = args.url.rstrip("/")
    try:
        levels = [int(c) for c in args.clients.split(",")]
    except ValueError:
        raise SystemExit(f"error: --clients {args.clients!r} is not a comma-separated list of numbers")
    if any(c < 1 for c in levels) or args.requests < 1 or args.max_tokens < 1 or args.prompt_tokens < 1:
        raise SystemExit("error: clients, requests, prompt and max tokens must be at least 1")
    if args.shared_prefix >= args.prompt_tokens:
        raise SystemExit("error: --shared-prefix must be shorter than --prompt-tokens")

    vocab = asyncio.run(vocab_size(args))
    rng = random.Random(args.seed)
    cols = ["clients", "completed", "failed", "generated_tokens", "wall_s", "aggregate_tok_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99"]
    if not args.json:
        print(f"# {args.url}: {args.requests} requests per client, prompt {args.prompt_tokens} tokens, {args.max_tokens} generated", file=sys.stderr)
        print(" ".join(f"{c:>16}" for c in cols))
    failed = False
    for c in levels:
        row = asyncio.run(run_level(args, c, vocab, rng))
        failed |= row["failed"] > 0
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(" ".join(f"{str(row[k]):>16}" for k in cols), flush=True)
            if row["first_failure"]:
                print(f"  first failure: {row['first_failure']}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
