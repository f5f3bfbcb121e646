"""The service from the command line: a key made with `blackbox keys new`, a keyed server,
and a tune, `info` and their errors as a tenant sees them."""

from __future__ import annotations

import json

import pytest

from backbone_server.server import Service, create_server
from backbone_server.tenants import TenantDirectory, load_tenants
from blackbox.cli import main

TUNE = ["tune", "--task", "sst2", "--seed", "13", "--budget", "16", "--popsize", "4", "--dim", "4",
        "--prompt-length", "2", "--test-limit", "16", "--quiet"]


@pytest.fixture
def keys_file(tmp_path, capsys):
    path = tmp_path / "keys.json"
    keys = {}
    for tenant, quota in (("alice", 0), ("bob", 30)):
        assert main(["keys", "new", "--tenant", tenant, "--quota-calls", str(quota), "--keys-file", str(path)]) == 0
        keys[tenant] = capsys.readouterr().out.strip()
    return path, keys


@pytest.fixture
def keyed_server(tiny_llama, keys_file, tmp_path):
    path, keys = keys_file
    running = create_server("tiny-llama", "127.0.0.1:0", backbone=tiny_llama,
                            service=Service(tenants=TenantDirectory(load_tenants(path)),
                                            state_db=tmp_path / "state.sqlite"))
    running.wait_ready(timeout=60)
    yield running, keys
    running.stop(grace=0)


def test_keys_new_prints_the_key_once_and_the_file_holds_only_its_hash(keys_file, capsys):
    path, keys = keys_file
    text = path.read_text()
    assert keys["alice"].startswith("bbx_") and keys["alice"] not in text
    tenants = {tenant.name: tenant for tenant in load_tenants(path).values()}
    assert tenants["bob"].quota_calls == 30 and tenants["alice"].max_sessions == 4
    assert (path.stat().st_mode & 0o777) == 0o600
    assert main(["keys", "new", "--tenant", "alice", "--keys-file", str(path)]) == 2
    assert "already" in capsys.readouterr().err and path.read_text() == text


def test_a_tenant_tunes_and_sees_its_metered_use(keyed_server, tmp_path, capsys, monkeypatch):
    running, keys = keyed_server
    monkeypatch.setenv("BLACKBOX_API_KEY", keys["alice"])
    out = tmp_path / "run"
    assert main([*TUNE, "--server", running.address, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "label bias off: the server returns no logits" in err
    result = json.loads((out / "result.json").read_text())
    assert result["calibrate"] is False and result["api_calls"] == 16
    assert main(["info", "--server", running.address]) == 0
    usage = json.loads(capsys.readouterr().out)["usage"]
    assert usage["tenant"] == "alice" and usage["calls_used"] == result["metered_calls"] > result["api_calls"]
    assert usage["sessions_held"] == 0  # the run closed its session


def test_a_tenant_without_a_key_or_past_its_quota_gets_one_clear_error(keyed_server, tmp_path, capsys,
                                                                       monkeypatch):
    running, keys = keyed_server
    monkeypatch.delenv("BLACKBOX_API_KEY", raising=False)
    assert main(["info", "--server", running.address]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main([*TUNE, "--server", running.address, "--api-key", keys["bob"], "--budget", "40",
                 "--out", str(tmp_path / "bob")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "RESOURCE_EXHAUSTED" in err and "quota_calls" in err
    assert running.servicer.engine.sessions.held_by("bob") == 0


def test_connection_options_need_a_server(capsys):
    assert main([*TUNE, "--model", "tiny-llama", "--api-key", "k", "--out", "unused"]) == 2
    assert "--api-key is how a client reaches a --server" in capsys.readouterr().err


def test_tune_save_as_then_predict_and_manage_the_stored_delta(tiny_llama, tmp_path, capsys, monkeypatch):
    running = create_server("tiny-llama", "127.0.0.1:0", backbone=tiny_llama,
                            service=Service(state_db=tmp_path / "state.sqlite"))
    running.wait_ready(timeout=60)
    try:
        out = tmp_path / "run"
        assert main([*TUNE, "--server", running.address, "--out", str(out), "--save-as", "sst2-prompt"]) == 0
        assert "saved the best z" in capsys.readouterr().err
        assert main(["deltas", "list", "--server", running.address]) == 0
        (listed,) = json.loads(capsys.readouterr().out)
        assert listed["name"] == "sst2-prompt" and listed["task"] == "sst2" and listed["z_dim"] == 4
        texts = tmp_path / "texts.jsonl"
        texts.write_text("".join(json.dumps({"text_a": f"text number {i} was great"}) + "\n" for i in range(300)))
        whole = tmp_path / "whole.jsonl"
        assert main(["predict", "--server", running.address, "--delta-name", "sst2-prompt", "--input", str(texts),
                     "--out", str(whole), "--quiet"]) == 0
        lines = [json.loads(line) for line in whole.read_text().splitlines()]
        assert len(lines) == 300 and set(lines[0]) == {"text_a", "label", "label_word", "probabilities"}
        assert lines[0]["label_word"] in ("terrible", "great") and abs(sum(lines[0]["probabilities"]) - 1) < 1e-5
        partial = tmp_path / "partial.jsonl"  # a predict stopped mid-line
        partial.write_text("".join(whole.read_text().splitlines(keepends=True)[:7]) + '{"text_a": "text nu')
        assert main(["predict", "--server", running.address, "--delta-name", "sst2-prompt", "--input", str(texts),
                     "--out", str(partial), "--quiet"]) == 0
        assert "293 texts now, 7 from before" in capsys.readouterr().out
        assert partial.read_text() == whole.read_text()
        from_run = tmp_path / "from_run.jsonl"  # the run folder itself, given whole
        assert main(["predict", "--server", running.address, "--run", str(out), "--input", str(texts),
                     "--out", str(from_run), "--quiet"]) == 0
        assert from_run.read_text() == whole.read_text()
        assert main([*TUNE, "--server", running.address, "--out", str(tmp_path / "again"),
                     "--save-as", "sst2-prompt"]) == 2
        assert "already" in capsys.readouterr().err
        assert main(["deltas", "delete", "--server", running.address, "--name", "sst2-prompt"]) == 0
        assert "deleted" in capsys.readouterr().out
        assert main(["deltas", "list", "--server", running.address]) == 0
        assert json.loads(capsys.readouterr().out) == []
    finally:
        running.stop(grace=0)


def test_predict_a_run_folder_without_a_server(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TUNE, "--model", "tiny-llama", "--out", str(out)]) == 0
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text_a": "a fine film"}) + "\n")
    assert main(["predict", "--run", str(out), "--input", str(texts), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert json.loads((tmp_path / "p.jsonl").read_text())["label"] in (0, 1)
    assert main(["predict", "--delta-name", "x", "--input", str(texts), "--out", str(tmp_path / "q.jsonl")]) == 2
    assert "--delta-name names a delta stored on a --server" in capsys.readouterr().err
