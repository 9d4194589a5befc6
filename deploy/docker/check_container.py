#!/usr/bin/env python3
"""Builds the repository's Dockerfile for real and runs the image: a Docker
daemon started here (Debian's docker.io, no registry: the base image is made
with debootstrap and imported), the image built from BINARY (the Dockerfile's
`BUILD=prebuilt`, so no Rust image is needed), run with MODEL mounted at
/models; it must become healthy through its HEALTHCHECK, answer a chat
completion, and exit 0 on SIGTERM (`docker stop`), as PID 1.

    python3 deploy/docker/check_container.py BITNET_BINARY MODEL

Needs root, dockerd and docker (Debian's docker.io) and debootstrap. Set
BITNET_BASE_ROOTFS to a debootstrapped folder to skip making one. The full
multi-stage build from source is `scripts/docker-build.sh`. Exits non-zero
with the first thing that is wrong.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checklib import failer, free_port, http  # noqa: E402

fail = failer("container")

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "bitnet-rs:check"
# Debian's client builds with BuildKit without buildx (a newer client elsewhere
# on the PATH may insist on buildx).
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"


class Daemon:
    def __init__(self, work: Path):
        self.work, self.sock = work, work / "docker.sock"
        self.log = open(work / "dockerd.log", "w")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(work / "data"), "--exec-root", str(work / "exec"), "--pidfile", str(work / "dockerd.pid"),
             "-H", f"unix://{self.sock}", "--iptables=false", "--bridge=none"],
            stdout=self.log, stderr=subprocess.STDOUT)
        end = time.time() + 60
        while self.docker("version", check=False).returncode != 0:
            if time.time() > end or self.proc.poll() is not None:
                fail(f"dockerd did not start:\n{(work / 'dockerd.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def docker(self, *args, check=True, **kw):
        env = dict(os.environ, DOCKER_BUILDKIT="1", DOCKER_HOST=f"unix://{self.sock}")
        r = subprocess.run([DOCKER, *args], capture_output=True, text=True, env=env, **kw)
        if check and r.returncode != 0:
            fail(f"docker {' '.join(args)}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
        return r

    def stop(self):
        self.docker("rm", "-f", "bitnet-check", check=False)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        netns = self.work / "exec" / "netns"
        if netns.is_dir():
            for n in netns.iterdir():
                subprocess.run(["umount", str(n)], capture_output=True)


def base_image(d: Daemon, work: Path):
    rootfs = os.environ.get("BITNET_BASE_ROOTFS")
    if not rootfs:
        rootfs = work / "rootfs"
        r = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)], capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"debootstrap:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    d.docker("import", "-", "debian:bookworm-slim", stdin=tar.stdout)
    tar.wait()


def main():
    if len(sys.argv) != 3:
        fail("usage: check_container.py BITNET_BINARY MODEL")
    binary, model = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    work = Path(tempfile.mkdtemp(prefix="bitnet-container-"))
    d = Daemon(work)
    try:
        t0 = time.time()
        base_image(d, work)
        print(f"base image in {time.time() - t0:.0f} s")
        ctx = work / "context"
        (ctx / "deploy/docker/no-model").mkdir(parents=True)
        shutil.copy(ROOT / "Dockerfile", ctx / "Dockerfile")
        (ctx / "deploy/docker/no-model/.keep").touch()
        subprocess.run(["strip", "-o", str(ctx / "bitnet"), str(binary)], check=True)
        t0 = time.time()
        d.docker("build", "--network", "host", "--build-arg", "BUILD=prebuilt", "-t", IMAGE, str(ctx))
        print(f"image built in {time.time() - t0:.0f} s")
        config = json.loads(d.docker("image", "inspect", IMAGE).stdout)[0]["Config"]
        if config.get("User") in (None, "", "root", "0", "0:0"):
            fail(f"the image runs as root: User={config.get('User')!r}")
        if not config.get("Healthcheck", {}).get("Test"):
            fail("the image has no HEALTHCHECK")
        if config.get("Entrypoint") != ["bitnet"]:
            fail(f"the entry point is {config.get('Entrypoint')}, not bitnet")

        port = free_port()
        d.docker("run", "-d", "--name", "bitnet-check", "--network", "host", "-e", f"BITNET_PORT={port}",
                 "--health-interval", "1s", "--health-start-period", "60s", "-v", f"{model.parent}:/models:ro", IMAGE,
                 "serve", "--model", f"/models/{model.name}", "--host", "127.0.0.1", "--port", str(port), "--chat-template", "chatml", "-t", "1")
        end, health = time.time() + 90, ""
        while health != "healthy":
            state = json.loads(d.docker("inspect", "bitnet-check").stdout)[0]["State"]
            health = state.get("Health", {}).get("Status", "")
            if not state["Running"] or health == "unhealthy" or time.time() > end:
                fail(f"the container did not become healthy ({health}, running {state['Running']}):\n"
                     f"{d.docker('logs', 'bitnet-check', check=False).stderr[-2000:]}")
            time.sleep(0.5)
        status, body = http(f"http://127.0.0.1:{port}/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 16, "temperature": 0})
        if status != 200 or not json.loads(body)["choices"][0]["message"]["content"]:
            fail(f"the chat completion failed: {status} {body[:300]!r}")
        d.docker("stop", "-t", "30", "bitnet-check")
        state = json.loads(d.docker("inspect", "bitnet-check").stdout)[0]["State"]
        logs = d.docker("logs", "bitnet-check").stderr
        if state["ExitCode"] != 0 or "stopping" not in logs:
            fail(f"SIGTERM did not stop the server cleanly (exit {state['ExitCode']}):\n{logs[-2000:]}")
        print(f"container ok: {IMAGE} runs as {config['User']}, became healthy, answered a chat completion, and exited 0 on SIGTERM")
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
