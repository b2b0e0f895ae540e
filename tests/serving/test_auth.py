"""API keys: the key file, rotation, and where a key is read from."""

from __future__ import annotations

import os

import pytest

from inference_pod.errors import InvalidInput, Unauthenticated
from inference_pod.serving import auth
from inference_pod.serving.auth import ApiKeys, key_from_metadata, parse_keys


def test_key_file_format():
    assert parse_keys("# comment\n  key-one  \n\nkey-two\n   # indented comment\n") == ["key-one", "key-two"]


def test_disabled_without_keys():
    keys = ApiKeys()
    assert not keys.enabled
    keys.check(None)  # everything is accepted


def test_check_accepts_listed_keys_only(tmp_path):
    path = tmp_path / "keys"
    path.write_text("alpha\nbeta\n")
    keys = ApiKeys(path)
    keys.check("alpha")
    keys.check("beta")
    with pytest.raises(Unauthenticated, match="required"):
        keys.check(None)
    with pytest.raises(Unauthenticated, match="not valid"):
        keys.check("alphabet")


def test_rotated_file_is_picked_up_and_an_unreadable_one_is_not(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "keys"
    path.write_text("old\n")
    keys = ApiKeys(path)
    path.write_text("new-key\n")
    os.utime(path, ns=(1, 1))  # a different mtime even within the filesystem's time granularity
    keys.check("new-key")
    with pytest.raises(Unauthenticated):
        keys.check("old")
    path.unlink()  # a Secret mid-rotation: the last good keys stay
    keys.check("new-key")


def test_an_emptied_file_refuses_every_key_until_keys_are_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "keys"
    path.write_text("good-key\n")
    keys = ApiKeys(path)
    path.write_text("# emptied by mistake\n")
    os.utime(path, ns=(2, 2))
    with caplog.at_level("ERROR", logger="inference_pod.serving.auth"):
        with pytest.raises(Unauthenticated, match="holds no keys"):
            keys.check("good-key")  # fail closed: an empty file means no key is accepted
    assert any("now empty" in r.message and r.levelname == "ERROR" for r in caplog.records)
    with pytest.raises(Unauthenticated, match="holds no keys"):
        keys.check(None)
    path.write_text("good-key\n")
    os.utime(path, ns=(3, 3))
    keys.check("good-key")


def test_missing_or_empty_file_fails_at_start(tmp_path):
    with pytest.raises(InvalidInput, match="cannot be read"):
        ApiKeys(tmp_path / "absent")
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(InvalidInput, match="no keys"):
        ApiKeys(tmp_path / "empty")


def test_key_from_metadata():
    assert key_from_metadata([("x-api-key", " k1 ")]) == "k1"
    assert key_from_metadata([("authorization", "Bearer k2")]) == "k2"
    assert key_from_metadata([("authorization", "bearer k3")]) == "k3"
    assert key_from_metadata([("authorization", "Basic abc")]) is None
    assert key_from_metadata([("other", "x")]) is None
    assert key_from_metadata(None) is None
