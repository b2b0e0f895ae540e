"""The chart's Redis as the cluster would run it: the rendered container's arguments and environment (the
password from the rendered Secret, $(VAR) expanded as the kubelet does) given to a real redis-server on
loopback; the URL the operator hands to the inference pods, the readiness probe and the `helm test`
container's commands run against it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import redis
from chart_support import NAMESPACE, RELEASE, container_env, expand, find, render
from conditions import wait_until
from redis.backoff import NoBackoff
from redis.retry import Retry

from lipsync_operator.config import OperatorConfig

PASSWORD = "correct-horse-battery-staple"
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                                reason="redis-server and redis-cli are needed (make system-deps)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(host: str, port: int, password: str | None = None) -> redis.Redis:
    """A client that reports a refusal at once (redis-py retries connection errors, refusals included)."""
    return redis.Redis(host=host, port=port, password=password, socket_timeout=5, retry=Retry(NoBackoff(), 0))


def redis_container(docs: list[dict]) -> dict:
    (dep,) = find(docs, "Deployment", f"{RELEASE}-redis")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def docs(chart):
    return render(chart, {"redis": {"enabled": True, "auth": {"password": PASSWORD}}})


@pytest.fixture(scope="module")
def chart_redis(docs, tmp_path_factory):
    """redis-server with the rendered arguments (plus a loopback port): as the chart's Redis runs."""
    container = redis_container(docs)
    env = container_env(container, docs)
    args = [expand(arg, env) for arg in container["args"]]
    assert args[0] == "redis-server"
    port = free_port()
    proc = subprocess.Popen(args + ["--port", str(port)],   # every interface, as in the pod
                            cwd=tmp_path_factory.mktemp("redis"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    def listening() -> bool:
        assert proc.poll() is None, f"redis-server {args[1:]} exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_until(listening, what=f"redis-server {args[1:]} to listen", timeout=60)
    except AssertionError:
        proc.kill()
        raise
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def run_shell(command: list[str], env: dict[str, str], port: int, tmp_path: Path) -> subprocess.CompletedProcess:
    """A container's `sh -c` command, with a redis-cli that talks to the test's port by default (inside the
    pod, Redis is on the default port)."""
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "redis-cli").write_text(f'#!/bin/sh\nexec {shutil.which("redis-cli")} -p {port} "$@"\n')
    (shim / "redis-cli").chmod(0o755)
    full_env = {"PATH": f"{shim}:{os.environ['PATH']}", **env}
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=30)


def test_redis_refuses_clients_without_the_password(chart_redis):
    with pytest.raises(redis.AuthenticationError):
        client("127.0.0.1", chart_redis).get("frame:alice:0")
    with pytest.raises(redis.AuthenticationError):
        client("127.0.0.1", chart_redis, "wrong-password-xxxx").ping()


def test_the_url_the_operator_hands_to_inference_pods_opens_redis(docs, chart_redis):
    (dep,) = find(docs, "Deployment", f"{RELEASE}-operator")
    env = container_env(dep["spec"]["template"]["spec"]["containers"][0], docs)
    url = OperatorConfig.from_env(env).default_redis_url
    host = f"{RELEASE}-redis.{NAMESPACE}.svc:6379"
    assert f":{PASSWORD}@{host}/" in url
    pod_client = redis.Redis.from_url(url.replace(host, f"127.0.0.1:{chart_redis}"), socket_timeout=5)
    pod_client.set("frame:alice:0", b"jpeg", ex=60)
    assert pod_client.get("frame:alice:0") == b"jpeg"
    # The chart's settings reached the server.
    assert pod_client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    assert pod_client.config_get("protected-mode") == {"protected-mode": "yes"}


def non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def test_remote_clients_get_in_with_the_password_only(chart_redis):
    """Inference pods connect from other addresses: protected mode must admit them when they authenticate
    (the cache would be dead otherwise) and refuse them when they do not."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback address on this machine")
    assert client(address, chart_redis, PASSWORD).ping() is True
    with pytest.raises(redis.AuthenticationError):
        client(address, chart_redis).get("frame:alice:0")


def test_the_readiness_probe_passes_only_with_the_password(docs, chart_redis, tmp_path):
    container = redis_container(docs)
    probe = container["readinessProbe"]["exec"]["command"]
    env = container_env(container, docs)
    assert run_shell(probe, env, chart_redis, tmp_path).returncode == 0
    assert run_shell(probe, {**env, "REDISCLI_AUTH": "wrong-password-xxxx"}, chart_redis, tmp_path).returncode != 0


def test_helm_test_checks_that_redis_wants_the_password(docs, chart_redis, tmp_path):
    (pod,) = find(docs, "Pod")
    (ping,) = [c for c in pod["spec"]["containers"] if c["name"] == "redis-ping"]
    env = container_env(ping, docs)
    assert env["REDIS_HOST"] == f"{RELEASE}-redis.{NAMESPACE}.svc"
    env.update(REDIS_HOST="127.0.0.1", REDIS_PORT=str(chart_redis))
    ok = run_shell(ping["command"], env, chart_redis, tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert run_shell(ping["command"], {**env, "REDISCLI_AUTH": "wrong-password-xxxx"}, chart_redis,
                     tmp_path).returncode != 0


def test_helm_test_fails_against_a_redis_open_to_anyone(docs, tmp_path):
    """The chart's old Redis (no password, protected mode off) must not pass `helm test`."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--protected-mode", "no"], cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                                          text=True).stdout.strip() == "PONG", what="redis-server to answer PING",
                   timeout=60)
        (pod,) = find(docs, "Pod")
        (ping,) = [c for c in pod["spec"]["containers"] if c["name"] == "redis-ping"]
        env = {**container_env(ping, docs), "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(port)}
        result = run_shell(ping["command"], env, port, tmp_path)
        assert result.returncode != 0
        assert "without the password: PONG" in result.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=10)
