"""The mess-ai command line: exit codes, summaries, check, failures, make-test-model, demo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from cli.main import main
from mess_ai.extraction.stats import RunSummary, process_started_at
from mess_ai.store import FeatureStore
from mess_ai.store.atomic import atomic_save_npy
from tests.helpers.audio import write_audio, write_not_audio
from tests.helpers.flows import count_flow_runs


# `extract`, `retry-failed` and `demo` run the Prefect flow: one temporary Prefect API serves the module.
pytestmark = pytest.mark.usefixtures("prefect_api")


def extract(audio, store, model, *extra):
    return main(["extract", str(audio), "--store", str(store), "--model", model, "--device", "cpu", *extra])


def test_extract_exit_codes_and_summary(tmp_path, tiny_model, capsys):
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "good.wav", seconds=3.0)
    assert extract(audio, store, tiny_model) == 0
    out = capsys.readouterr().out
    assert re.search(r"done \(extracted now\): +1\n", out) and "features:" in out

    write_not_audio(audio / "bad.wav")
    assert extract(audio, store, tiny_model) == 1
    out = capsys.readouterr().out
    assert "bad.wav" in out and "[validate]" in out and re.search(r"unchanged \(skipped\): +1\n", out)

    assert extract(audio, store, tiny_model) == 1  # still failed: unchanged bytes are not retried
    assert re.search(r"failed before, same bytes \(not retried\): +1\n", capsys.readouterr().out)

    assert extract(audio, store, tiny_model, "--json") == 1
    data = json.loads(capsys.readouterr().out)
    assert data["previously_failed"] == 1 and data["exit_code"] == 1 and data["model_loaded"] is False


def test_work_goes_through_a_flow_run_and_nothing_new_starts_nothing(tmp_path, tiny_model, capsys, prefect_api):
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "good.wav", seconds=6.0)
    write_not_audio(audio / "bad.wav")
    runs = count_flow_runs()
    assert extract(audio, store, tiny_model, "--json") == 1
    assert count_flow_runs() == runs + 1
    data = json.loads(capsys.readouterr().out)
    assert data["model_loaded"] and data["model_load_seconds"] > 0
    # Seconds since this (test) process started: after the model load, and not later than now.
    assert data["model_load_seconds"] < data["first_window_seconds"] < time.time() - process_started_at()
    assert json.loads(json.dumps(RunSummary.from_dict(data).to_dict())) == data

    # As a user runs it, in a process of its own; -X importtime lists every module it imported.
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "cli", "extract", str(audio), "--store",
                           str(store), "--model", tiny_model, "--device", "cpu"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PREFECT_API_URL=prefect_api))
    imported = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "sqlalchemy" in imported and not imported & {"prefect", "torch", "transformers"}
    assert proc.returncode == 1  # bad.wav failed for good: the exit code says so, as a flow run's would
    assert re.search(r"unchanged \(skipped\): +1\n", proc.stdout) and "bad.wav" in proc.stdout
    assert "the model was not loaded" in proc.stdout and proc.stdout.endswith("no flow run was started\n")
    assert count_flow_runs() == runs + 1


def test_usage_and_configuration_errors_exit_2(tmp_path, tiny_model, capsys, prefect_api):
    write_audio(tmp_path / "audio" / "a.wav", seconds=2.0)
    assert extract(tmp_path / "missing", tmp_path / "store", tiny_model) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["extract", str(tmp_path / "audio"), "--store", str(tmp_path / "s"), "--model", tiny_model,
                 "--hop-seconds", "9"]) == 2
    assert "hop" in capsys.readouterr().err
    # As a user sees it, in a process of its own: one clear message, no traceback.
    proc = subprocess.run([sys.executable, "-m", "cli", "extract", str(tmp_path / "audio"), "--store",
                           str(tmp_path / "store"), "--model", str(tmp_path / "no-model")],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PREFECT_API_URL=prefect_api))
    assert proc.returncode == 2
    assert "no-model" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_offline_hub_model_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    write_audio(tmp_path / "audio" / "a.wav", seconds=2.0)
    assert main(["extract", str(tmp_path / "audio"), "--store", str(tmp_path / "store"),
                 "--revision", "v1.0"]) == 2
    err = capsys.readouterr().err
    assert "m-a-p/MERT-v1-95M" in err and "v1.0" in err and "HF_HUB_OFFLINE" in err


def test_check_finds_broken_orphan_and_temp_files(tmp_path, tiny_model, capsys):
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "a.wav", seconds=6.0)
    write_audio(audio / "b.wav", seconds=3.0, frequency=300)
    assert extract(audio, store, tiny_model) == 0
    assert main(["check", "--store", str(store)]) == 0
    assert "OK" in capsys.readouterr().out

    fs = FeatureStore(store, "audio")
    rows = fs.manifest.rows("audio")
    a, b = rows[0]["track_id"], rows[1]["track_id"]
    bad = np.full((3, 32), np.nan, dtype=np.float32)
    atomic_save_npy(fs.path("aggregated", a), bad)  # non-finite
    atomic_save_npy(fs.path("segments", b), np.zeros((5, 3, 32), np.float32))  # wrong n_windows
    atomic_save_npy(fs.path("segments", "stray-123"), np.zeros((1, 3, 32), np.float32))  # orphan
    (fs.path("segments", a).parent / f".{a}.npy.tmp-1-abcd").write_bytes(b"half")
    fs.path("aggregated", b).unlink()
    fs.close()

    assert main(["check", "--store", str(store), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    reasons = sorted(p["reason"] for p in report["problems"])
    assert len(reasons) == 5, reasons
    assert any("non-finite" in r for r in reasons)
    assert any("shape [5, 3, 32]" in r for r in reasons)
    assert any("orphan" in r for r in reasons)
    assert any("temporary" in r for r in reasons)
    assert any("missing" in r for r in reasons)


def test_failures_lists_stage_reason_attempts(tmp_path, tiny_model, capsys):
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "ok.wav", seconds=2.0)
    write_audio(audio / "short.wav", seconds=0.5)
    extract(audio, store, tiny_model)
    capsys.readouterr()
    assert main(["failures", "--store", str(store), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["relative_path"], r["failure_stage"], r["attempts"]) for r in rows] == [("short.wav", "validate", 1)]
    assert "too short" in rows[0]["error_message"] and rows[0]["last_attempt_at"]
    assert main(["failures", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "short.wav" in out and "attempts: 1" in out
    assert main(["failures", "--store", str(tmp_path / "nostore")]) == 2
    assert main(["check", "--store", str(store), "--dataset", "nope"]) == 1
    assert not (store / "nope").exists()


def test_only_failed_retries_failed_files(tmp_path, tiny_model, capsys):
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "ok.wav", seconds=2.0)
    write_audio(audio / "short.wav", seconds=0.5)
    extract(audio, store, tiny_model)
    capsys.readouterr()
    write_audio(audio / "short.wav", seconds=1.5)  # fixed by its owner
    assert extract(audio, store, tiny_model, "--only-failed", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["discovered"], data["done"], data["not_selected"]) == (2, 1, 1)  # ok.wav: not selected
    fs = FeatureStore(store, "audio")
    assert {r["relative_path"]: r["status"] for r in fs.manifest.rows("audio")} == {"ok.wav": "done",
                                                                                    "short.wav": "done"}
    fs.close()


def test_retry_failed_reads_the_folder_from_the_manifest(tmp_path, tiny_model, capsys):
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "ok.wav", seconds=2.0)
    write_audio(audio / "sub" / "short.wav", seconds=0.5)
    extract(audio, store, tiny_model)
    write_audio(audio / "sub" / "short.wav", seconds=1.5)  # fixed by its owner
    capsys.readouterr()
    assert main(["retry-failed", "--store", str(store), "--model", tiny_model, "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(o["relative_path"], o["status"]) for o in data["outcomes"]] == [("sub/short.wav", "done")]
    assert main(["retry-failed", "--store", str(store), "--model", tiny_model]) == 0
    assert "nothing to retry" in capsys.readouterr().out


def test_make_test_model(tmp_path, capsys):
    assert main(["make-test-model", str(tmp_path / "m")]) == 0
    assert "RANDOM" in capsys.readouterr().out
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mert_model" and config["architectures"] == ["MERTModel"]
    assert sum(p.stat().st_size for p in (tmp_path / "m").iterdir()) < 1_000_000


def test_demo(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "RANDOM" in out and "segments" in out and "not_really_audio.wav" in out
    assert (tmp_path / "demo" / "store" / "demo" / "provenance.json").exists()
