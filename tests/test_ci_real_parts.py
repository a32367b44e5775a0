"""CI never goes green by skipping the suites that need the real redis-server."""

from __future__ import annotations

import pytest
from redis_fixtures import RedisServer


def _start_without_redis(tmp_path, monkeypatch, ci: str) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no redis-server on it
    monkeypatch.setenv("CI", ci)
    RedisServer(tmp_path).start()


def test_missing_redis_server_fails_the_run_in_ci(tmp_path, monkeypatch):
    with pytest.raises(pytest.fail.Exception, match="redis-server is not installed.*CI requires"):
        _start_without_redis(tmp_path, monkeypatch, "true")


def test_missing_redis_server_skips_on_a_developer_machine(tmp_path, monkeypatch):
    with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
        _start_without_redis(tmp_path, monkeypatch, "")


def test_ci_script_sets_ci():
    from conftest import REPO

    assert "export CI=true" in (REPO / ".ci" / "run").read_text()
