"""Clients for `bitnet serve`, run by tests/server.rs against a live server.

    python3 tests/server_client.py openai URL KEY EXPECTED_JSON
    python3 tests/server_client.py load URL KEY EXPECTED_JSON
    python3 tests/server_client.py bad URL KEY

EXPECTED_JSON maps each prompt to the greedy text `bitnet run --json`
printed for it. Each check raises (exit status 1) on the first thing wrong.
"""

import json
import socket
import sys
import threading
import urllib.error
import urllib.request


def metrics(url):
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def check_openai(url, key, expected):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    models = client.models.list()
    assert len(models.data) == 1 and models.data[0].id, models
    for prompt, text in expected.items():
        # Text completions, greedy: exactly `bitnet run --greedy`'s text.
        c = client.completions.create(model="anything", prompt=prompt, max_tokens=20, temperature=0)
        assert c.choices[0].text == text, (prompt, c.choices[0].text, text)
        assert (c.usage.completion_tokens == 20) == (c.choices[0].finish_reason == "length"), c
        # Streamed: the pieces join to the same text.
        pieces = []
        for chunk in client.completions.create(model="x", prompt=prompt, max_tokens=20, temperature=0, stream=True):
            pieces.extend(ch.text for ch in chunk.choices)
        assert "".join(pieces) == text, (pieces, text)
    # Chat, whole and streamed, agree; usage comes last when asked for.
    msgs = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "Once upon a time"}]
    whole = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0, seed=1)
    content = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and content, whole
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    parts, usage = [], None
    stream = client.chat.completions.create(
        model="m", messages=msgs, max_tokens=12, temperature=0, seed=1, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
    assert "".join(parts) == content, (parts, content)
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage
    # Stop strings never reach the client.
    first = next(iter(expected))
    word = expected[first].split()[2]
    c = client.completions.create(model="m", prompt=first, max_tokens=20, temperature=0, stop=[word])
    assert word not in c.choices[0].text and c.choices[0].finish_reason == "stop", c
    assert expected[first].startswith(c.choices[0].text), c
    # Logprobs: the greedy token is the most likely one.
    c = client.chat.completions.create(model="m", messages=msgs, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    for entry in c.choices[0].logprobs.content:
        assert entry.logprob <= 0 and abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-4, entry
    # Logit biases: +100 forces a token at every step (" ha", id 300, in
    # stories260K's vocabulary); -100 bans the greedy first token.
    forced = client.completions.create(model="m", prompt=first, max_tokens=4, temperature=0, logit_bias={"300": 100})
    status, j = request(url, "/detokenize", {"tokens": [300] * 4}, key)
    assert status == 200 and forced.choices[0].text.strip() == j["content"].strip() != expected[first][:11].strip(), (forced, j)
    ids = lambda text: request(url, "/tokenize", {"content": text, "add_special": True}, key)[1]["tokens"]
    at = len(ids(first))
    greedy_first = ids(first + expected[first])[at]
    banned = client.completions.create(model="m", prompt=first, max_tokens=4, temperature=0, logit_bias={str(greedy_first): -100})
    assert ids(first + banned.choices[0].text)[at] != greedy_first and banned.choices[0].text != expected[first][: len(banned.choices[0].text)], banned
    # Structured output: whatever is drawn, a document of the schema, which
    # ends the completion; streamed, the pieces add up to one too.
    card = {
        "type": "object",
        "properties": {"mood": {"enum": ["happy", "sad"]}, "age": {"type": "integer", "minimum": 1, "maximum": 9}, "name": {"type": "string", "maxLength": 6}},
        "required": ["mood", "age", "name"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "card", "strict": True, "schema": card}}
    for seed in range(3):
        c = client.chat.completions.create(model="m", messages=msgs, max_tokens=200, temperature=1.2, seed=seed, response_format=fmt)
        doc = json.loads(c.choices[0].message.content)
        assert doc["mood"] in ("happy", "sad") and 1 <= doc["age"] <= 9 and len(doc["name"]) <= 6 and len(doc) == 3, doc
        assert c.choices[0].finish_reason == "stop", c
    pieces = []
    for chunk in client.completions.create(model="m", prompt=first, max_tokens=200, seed=5, stream=True, extra_body={"response_format": fmt}):
        pieces.extend(ch.text for ch in chunk.choices)
    assert set(json.loads("".join(pieces))) == {"mood", "age", "name"}, pieces
    # Each choice is held to the format (compiled once, copied to each).
    c = client.chat.completions.create(model="m", messages=msgs, max_tokens=200, temperature=1.2, seed=11, n=3, response_format=fmt)
    assert len(c.choices) == 3 and all(set(json.loads(ch.message.content)) == {"mood", "age", "name"} for ch in c.choices), c
    try:
        client.chat.completions.create(model="m", messages=msgs, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}})
        raise AssertionError("a schema that does not compile was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "response_format" and "bogus" in e.message, e.body
    # n choices: choice i is what one choice with the seed plus i draws; the
    # prompt is counted once, the completions' tokens summed.
    many = client.completions.create(model="m", prompt=first, max_tokens=12, temperature=1.0, seed=7, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2], many
    singles = [client.completions.create(model="m", prompt=first, max_tokens=12, temperature=1.0, seed=7 + i) for i in range(3)]
    for choice, one in zip(many.choices, singles):
        assert choice.text == one.choices[0].text and choice.finish_reason == one.choices[0].finish_reason, (choice, one)
    assert len({c.text for c in many.choices}) > 1, many
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens, many.usage
    assert many.usage.completion_tokens == sum(one.usage.completion_tokens for one in singles), many.usage
    # The choices share the prompt's KV blocks: the first computes them,
    # the others take them from the prefix cache.
    long = "One day, a little bird named Max flew over the big green hill to find his friend the old wise owl, who lived in a tall tree."
    at_long = len(ids(long))
    before = metrics(url)["bitnet_prefix_cache_tokens_total"]
    c = client.completions.create(model="m", prompt=long, max_tokens=2, temperature=1.0, seed=1, n=4)
    reused = metrics(url)["bitnet_prefix_cache_tokens_total"] - before
    whole_blocks = (at_long - 1) // 16 * 16
    assert at_long > 40 and reused == 3 * whole_blocks, (at_long, reused, c.usage)
    whole = client.chat.completions.create(model="m", messages=msgs, max_tokens=10, temperature=1.0, seed=3, n=2)
    parts, finishes, usage = {0: "", 1: ""}, {}, None
    stream = client.chat.completions.create(
        model="m", messages=msgs, max_tokens=10, temperature=1.0, seed=3, n=2, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            parts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert [parts[0], parts[1]] == [c.message.content for c in whole.choices], (parts, whole)
    assert finishes == {c.index: c.finish_reason for c in whole.choices}, (finishes, whole)
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == whole.usage.prompt_tokens, (usage, whole.usage)
    # An error case, in OpenAI's shape.
    try:
        client.chat.completions.create(model="m", messages=msgs, n=17)
        raise AssertionError("n=17 was accepted")
    except openai.BadRequestError as e:
        assert "n = 17" in e.message and e.body["param"] == "n", e.body
    try:
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError:
        pass


def stream_completion(url, key, prompt, max_tokens, cancel_after=None):
    """Streams a completion over a raw socket; returns its text, or None when
    it hung up after `cancel_after` chunks."""
    host, port = url.split("//")[1].split(":")
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    s = socket.create_connection((host, int(port)), timeout=60)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    f = s.makefile("rb")
    status = f.readline()
    assert b" 200 " in status, status
    text, chunks = "", 0
    for raw in f:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            s.close()
            return text
        chunk = json.loads(data)
        assert "error" not in chunk, chunk
        text += "".join(c["text"] for c in chunk["choices"])
        chunks += 1
        if cancel_after is not None and chunks >= cancel_after:
            s.close()
            return None
    raise AssertionError("the stream ended without [DONE]")


def check_load(url, key, expected):
    before = metrics(url)
    prompts = list(expected.items())
    results, errors = [], []

    def client(i):
        try:
            for r in range(3):
                prompt, text = prompts[(i + r) % len(prompts)]
                cancel = 2 if (i + r) % 5 == 0 else None
                got = stream_completion(url, key, prompt, 20, cancel)
                results.append((prompt, got, text, cancel))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(results) == 96, len(results)
    done = 0
    for prompt, got, text, cancel in results:
        if cancel is None:
            assert got == text, (prompt, got, text)
            done += 1
    # Cancelled ones have given their blocks back, and the counters add up.
    import time

    for _ in range(100):
        after = metrics(url)
        if after["bitnet_kv_blocks_used"] == 0 and after["bitnet_running_sequences"] == 0:
            break
        time.sleep(0.1)
    assert after["bitnet_kv_blocks_used"] == 0, after
    ok = 'bitnet_requests_total{endpoint="/v1/completions",status="200"}'
    assert after[ok] - before.get(ok, 0) == 96, (after[ok], before.get(ok))
    generated = after["bitnet_generated_tokens_total"] - before["bitnet_generated_tokens_total"]
    assert generated >= done * 20, (generated, done)


def request(url, path, body=None, key=None, headers=None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", "Bearer " + key)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else None


def check_bad(url, key):
    def error(status, path, body=None, k=key, want=None):
        got, j = request(url, path, body, k)
        assert got == status, (path, body if not isinstance(body, bytes) else body[:40], got, j)
        assert set(j["error"]) >= {"message", "type", "param", "code"}, j
        if want:
            assert want in j["error"]["message"], j

    error(400, "/v1/completions", b"{not json", want="not valid JSON")
    error(400, "/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, want="expected")
    error(400, "/v1/completions", {"prompt": "hi", "temperature": 9}, want="temperature")
    error(400, "/v1/completions", {"prompt": list(range(1, 400)) * 10}, want="context")
    error(400, "/v1/completions", {"prompt": [1, 99999]}, want="vocabulary")
    error(400, "/v1/chat/completions", {"messages": []}, want="empty")
    hi = {"prompt": "hi", "max_tokens": 2}
    error(400, "/v1/completions", {**hi, "logit_bias": {"abc": 1}}, want='"abc" is not a token id')
    error(400, "/v1/completions", {**hi, "logit_bias": {"99999": 1}}, want="outside the vocabulary")
    error(400, "/v1/completions", {**hi, "logit_bias": {"5": 101}}, want="between -100 and 100")
    error(400, "/v1/completions", {**hi, "logit_bias": {"5": "up"}}, want="expected")
    error(400, "/v1/completions", {**hi, "response_format": {"type": "json_schema"}}, want="response_format")
    error(400, "/v1/completions", {**hi, "response_format": {"type": "yaml"}}, want='unknown response format type "yaml"')
    error(400, "/v1/completions", {**hi, "grammar": "root ::= [a-"}, want="a character class is not closed")
    error(400, "/v1/completions", {**hi, "grammar": 'root ::= "a"', "json_schema": {}}, want="one of")
    status, j = request(url, "/v1/completions", {**hi, "max_tokens": 30, "grammar": 'root ::= ("yes" | "no") "!"{1,3}', "response_format": {"type": "text"}}, key)
    text = j["choices"][0]["text"]
    assert status == 200 and text.rstrip("!") in ("yes", "no") and 1 <= text.count("!") <= 3 and j["choices"][0]["finish_reason"] == "stop", j
    error(400, "/v1/completions", {**hi, "json_schema": {"type": "bogus"}}, want="bogus")
    error(400, "/v1/completions", {**hi, "json_schema": {}, "response_format": {"type": "json_object"}}, want="one of")
    status, j = request(url, "/v1/completions", {**hi, "max_tokens": 30, "json_schema": {"enum": ["yes", "no"]}}, key)
    assert status == 200 and j["choices"][0]["text"] in ('"yes"', '"no"') and j["choices"][0]["finish_reason"] == "stop", j
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    error(400, "/v1/chat/completions", {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, want="tools")
    error(400, "/v1/chat/completions", {**chat, "functions": [{"name": "f"}]}, want="functions")
    error(400, "/v1/completions", {**hi, "suffix": " the end"}, want="suffix")
    error(400, "/v1/completions", {**hi, "best_of": 3}, want="best_of")
    ok = {**hi, "logit_bias": {}, "response_format": {"type": "text"}, "suffix": "", "best_of": 1}
    assert request(url, "/v1/completions", ok, key)[0] == 200
    error(401, "/v1/models", k=None)
    error(401, "/v1/models", k="nope")
    error(404, "/v2/nothing", {"a": 1})
    error(413, "/v1/completions", b'{"prompt": "' + b"x" * (5 << 20) + b'"}')
    # A client that vanishes mid-stream, then the server still serves.
    assert stream_completion(url, key, "Once upon a time", 50, cancel_after=1) is None
    status, j = request(url, "/tokenize", {"content": "Once upon a time", "add_special": True}, key)
    assert status == 200 and j["tokens"][0] == 1, j
    status, j = request(url, "/detokenize", {"tokens": j["tokens"][1:]}, key)
    assert status == 200 and j["content"].strip() == "Once upon a time", j
    assert request(url, "/health")[0] == 200


if __name__ == "__main__":
    what, url, key = sys.argv[1], sys.argv[2], sys.argv[3]
    if what == "openai":
        check_openai(url, key, json.loads(sys.argv[4]))
    elif what == "load":
        check_load(url, key, json.loads(sys.argv[4]))
    elif what == "bad":
        check_bad(url, key)
    else:
        raise SystemExit("unknown check " + what)
    print("ok")
