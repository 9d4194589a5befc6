"""What the deployment checks (deploy/*/check_*.py) share: failing with a
message, a free loopback port, and a small HTTP client."""
import json
import socket
import sys
import urllib.error
import urllib.request


def failer(what):
    """`fail(msg)`: prints "WHAT check failed: msg" and exits 1."""

    def fail(msg):
        print(f"{what} check failed: {msg}", file=sys.stderr)
        sys.exit(1)

    return fail


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, body=None, timeout=60):
    """(status, body bytes); `body` is JSON-encoded unless it is bytes.
    Status None when nothing answers."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError):
        return None, b""
