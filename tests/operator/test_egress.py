"""The operator's registry policy (lipsync_operator.egress) and its entry point, on their own."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import urllib.error

import pytest
from lsm_harness import Registry

from lipsync_operator.config import OperatorConfig
from lipsync_operator.egress import RefusedConnection, RefusedURL, RegistryPolicy


@pytest.fixture()
def target(tmp_path):
    reg = Registry(tmp_path / "target")
    reg.root.mkdir()
    reg.add("alice", "1")
    reg.start()
    yield reg
    reg.stop()


def test_an_address_that_resolves_to_loopback_is_refused_at_connect_time(target):
    """``127.1`` passes as a host name, but resolves to 127.0.0.1: the connection itself refuses it."""
    port = target.url.rsplit(":", 1)[1].strip("/")
    policy = RegistryPolicy(["*"])
    with pytest.raises(urllib.error.URLError) as refused:
        policy.open(f"http://127.1:{port}/index.json", method="GET", headers={}, timeout=5)
    assert isinstance(refused.value.reason, RefusedConnection)
    assert "127.1 (127.0.0.1) is a loopback address" in str(refused.value.reason)
    assert target.requests == []


def test_an_exact_entry_reaches_loopback_and_nothing_else(target):
    port = int(target.url.rsplit(":", 1)[1].strip("/"))
    policy = RegistryPolicy([f"127.0.0.1:{port}"])
    with policy.open(f"{target.url}index.json", method="GET", headers={}, timeout=5) as response:
        assert b"alice" in response.read()
    with pytest.raises(RefusedURL, match="not under an allowed registry"):
        policy.check(f"http://127.0.0.1:{port + 1}/")
    assert len(target.requests) == 1


@pytest.mark.parametrize("entries, url, allowed", [
    (["registry.example.com"], "https://registry.example.com:8443/x/", True),
    (["registry.example.com:443"], "http://registry.example.com/", False),
    (["*.example.com"], "https://a.b.example.com/", True),
    (["*.example.com"], "https://example.com/", False),
    (["*.example.com"], "https://evil-example.com/", False),
    (["https://r.example.com/models/"], "https://r.example.com/models/alice/", True),
    (["https://r.example.com/models/"], "https://r.example.com/modelsx/", False),
    (["https://r.example.com/models/"], "http://r.example.com/models/", False),
    (["*"], "http://10.0.0.7:8000/", True),                   # in-cluster (private) addresses are ordinary
    (["*"], "http://[::ffff:169.254.169.254]/", False),       # IPv4-mapped metadata
    (["*"], "http://0.0.0.0:8000/", False),
    (["*"], "http://instance-data/", False),
    (["169.254.169.254"], "http://169.254.169.254/latest/", True),   # named exactly: the admin asked for it
    ([], "http://registry.example.com/", False),
])
def test_allow_list_forms(entries, url, allowed):
    policy = RegistryPolicy(entries)
    if allowed:
        policy.check(url)
    else:
        with pytest.raises(RefusedURL):
            policy.check(url)


@pytest.mark.parametrize("name, value, words", [
    ("ALLOWED_REGISTRIES", "http://r.example.com/?x=1", "a URL prefix is"),
    ("ALLOWED_REGISTRIES", "ex*ample.com", "expected host"),
    ("ALLOWED_IMAGES", "lipsync-inference:1.0", "without a tag or digest"),
    ("ALLOWED_IMAGES", "Bad Repo", "expected a repository"),
])
def test_a_malformed_allow_list_stops_the_operator_with_the_entry_named(name, value, words):
    with pytest.raises(ValueError, match=words):
        OperatorConfig.from_env({f"LIPSYNC_OPERATOR_{name}": value})


def test_importing_the_package_registers_no_handlers_only_the_entry_point_does():
    """``lipsync bench pool`` imports lipsync_operator.placement: no kopf handlers may come with it."""
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import kopf

        def count():
            r = kopf.get_default_registry()
            return sum(len(list(getattr(r, part).get_all_handlers()))
                       for part in ("_activities", "_indexing", "_watching", "_spawning", "_changing"))

        print(count())   # kopf's own (its default login activity)
        import lipsync_operator

        import lipsync_operator.placement
        print(count())
        for module in pkgutil.iter_modules(lipsync_operator.__path__):
            if module.name != "handlers":
                importlib.import_module(f"lipsync_operator.{module.name}")
        print(count())
        import lipsync_operator.handlers
        print(count())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    kopf_own, after_placement, after_all_but_entry, after_entry = map(int, proc.stdout.split())
    assert after_placement == kopf_own and after_all_but_entry == kopf_own
    assert after_entry > kopf_own
