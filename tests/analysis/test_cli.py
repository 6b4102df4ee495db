"""``mess-ai similar`` and ``mess-ai analyze`` through a parser of their own (``register`` is all the main CLI adds)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from cli import analysis as cli
from cli.demo import write_demo_audio
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import run_extraction
from tests.analysis.test_report import PNG_MAGIC, strict_json
from tests.helpers.embeddings import write_store


def run(*argv, analyze_runner=None) -> int:
    parser = argparse.ArgumentParser(prog="mess-ai")
    cli.register(parser.add_subparsers(dest="command", required=True), analyze_runner=analyze_runner)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, tiny_model):
    """The demo's recordings (one of them broken) extracted by the pipeline the demo runs, without the Prefect
    server the demo starts (that alone takes longer than all these tests)."""
    workdir = tmp_path_factory.mktemp("demo")
    write_demo_audio(workdir / "audio")
    summary = run_extraction(workdir / "audio", workdir / "store", dataset="demo",
                             config=ExtractConfig(model=tiny_model, device="cpu"))
    assert summary.done == 5 and len(summary.failures) == 1
    return workdir / "store"


def test_analyze_on_the_demo_store_writes_report_and_plots(demo_store, capsys):
    capsys.readouterr()
    assert run("analyze", "--store", demo_store) == 0
    out = capsys.readouterr().out
    assert "dataset 'demo', 5 tracks (3 hidden states x 32)" in out and "label 'folder'" in out
    for line in ("  agglomerative: ", "  dbscan: ", "PCA components for 90 % / 95 %", "participation ratio",
                 "under-covered: percussion", "best of 7 methods for 'folder': "):
        assert line in out
    reports = demo_store / "demo" / "reports"
    report = strict_json((reports / "report.json").read_text())
    assert report["n_tracks"] == 5 and report["baseline"]["available"] and report["baseline"]["n_tracks"] == 5
    for name in ("map", "explained_variance", "layer_metrics", "similarity_histogram", "method_comparison",
                 "coverage"):
        png = reports / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and str(png) in out
    assert not [p for p in reports.iterdir() if p.name.startswith(".")]  # no temporary files left

    assert run("analyze", "--store", demo_store, "--dataset", "demo", "--clusters", "3", "--json",
               "--no-baseline") == 0
    printed = strict_json(capsys.readouterr().out)
    assert printed["clusters"]["n_clusters"] == 3 and printed["baseline"]["reason"] == "not requested"


def test_analyze_prints_a_flow_result_as_it_prints_the_report(demo_store, tmp_path, capsys, caplog):
    """The main CLI runs the analysis as a flow, whose result is the report's JSON: the summary is the same, notes
    included. Labels naming a recording that is not extracted (the demo's broken file failed) are one: warned
    about, printed, and kept in the report file."""
    from mess_ai.analysis.report import run_analysis

    def as_flow(*args, **kwargs) -> dict:
        return run_analysis(*args, **kwargs).to_json()

    labels = tmp_path / "labels.csv"
    labels.write_text("file,instrument\nstrings/a_minor_drone.wav,strings\nstrings/e_major_drone.flac,strings\n"
                      "piano/arpeggio.ogg,piano\npiano/staccato.mp3,piano\npercussion/noise_bursts.wav,percussion\n"
                      "broken/not_really_audio.wav,none\n")
    note = (f"{labels}: 1 of 6 rows name recordings that are not extracted ('broken/not_really_audio.wav' "
            "(line 7)); the analysis uses the labels of the 5 that are extracted")
    capsys.readouterr()
    assert run("analyze", "--store", demo_store, "--no-baseline", "--labels", labels) == 0
    direct = capsys.readouterr().out
    assert f"  note: {note}\n" in direct and "label 'instrument': 5 labelled" in direct
    assert strict_json((demo_store / "demo" / "reports" / "report.json").read_text())["notes"][0] == note
    assert note in [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert run("analyze", "--store", demo_store, "--no-baseline", "--labels", labels, analyze_runner=as_flow) == 0
    assert capsys.readouterr().out == direct and "MFCC + chroma baseline: not computed (not requested)" in direct


def test_similar_on_the_demo_store(demo_store, capsys):
    capsys.readouterr()
    assert run("similar", "--store", demo_store, "piano/arpeggio.ogg", "-k", "2") == 0
    out = capsys.readouterr().out
    assert out.startswith("2 most similar tracks to piano/arpeggio.ogg") and "arpeggio" not in out.split("\n", 1)[1]
    assert run("similar", "--store", demo_store, "arpeggio.ogg", "--layer", "1", "--diverse", "--json") == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    assert all(set(r) == {"rank", "track_id", "relative_path", "similarity"} for r in results)


def test_usage_errors_exit_2_with_a_message(demo_store, tmp_path, capsys):
    capsys.readouterr()
    assert run("similar", "--store", demo_store, "no_such_track") == 2
    err = capsys.readouterr().err
    assert err.startswith("mess-ai: error: unknown track 'no_such_track' in dataset 'demo' (5 extracted tracks)")
    assert run("analyze", "--store", demo_store, "--clusters", "9") == 2
    assert "number of clusters is 9 for 5 tracks; valid values are 2 to n_tracks - 1 = 4" in capsys.readouterr().err
    labels = tmp_path / "labels.csv"
    labels.write_text("file,genre\nmissing.wav,none\n")
    assert run("analyze", "--store", demo_store, "--labels", labels) == 2
    assert "none of its 1 rows names an extracted track of the dataset (5 tracks): 'missing.wav' (line 2)" in (
        capsys.readouterr().err)
    assert run("analyze", "--store", tmp_path / "nowhere") == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run("similar", "--store", demo_store, "x", "--layer", "last")
    assert exit_info.value.code == 2 and "'mean'" in capsys.readouterr().err


def test_dataset_must_be_named_when_the_store_has_several(tmp_path, capsys):
    vectors = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    for name in ("one", "two"):
        write_store(tmp_path / "store", name, {f"t{i}": v for i, v in enumerate(vectors)})
    assert run("similar", "--store", tmp_path / "store", "t0") == 2
    assert "has 2 datasets (one, two): choose one with --dataset" in capsys.readouterr().err
    assert run("similar", "--store", tmp_path / "store", "--dataset", "two", "t0", "-k", "1") == 0
    assert "1 most similar tracks to t0" in capsys.readouterr().out


def test_the_first_query_says_it_builds_the_index_and_no_query_reads_as_an_error(tmp_path):
    """As a user runs it: the first query of a dataset, and the first after its tracks changed, say that the
    search index is being built and why; a query that finds the index built says nothing."""
    vectors = np.random.default_rng(0).standard_normal((4, 3, 8)).astype(np.float32)
    write_store(tmp_path / "store", "ds", {f"t{i}": v for i, v in enumerate(vectors[:3])})

    def similar() -> str:
        proc = subprocess.run([sys.executable, "-m", "cli", "similar", "--store", str(tmp_path / "store"), "t0"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "1. " in proc.stdout, proc.stderr
        assert not re.search("unusable|error", proc.stderr, re.IGNORECASE), proc.stderr
        return proc.stderr

    assert "building the search index of dataset 'ds' (3 tracks, layer mean): first query\n" in similar()
    assert "building" not in similar()
    write_store(tmp_path / "store", "ds", {"t3": vectors[3]})
    assert ("building the search index of dataset 'ds' (4 tracks, layer mean): the tracks changed since it was "
            "built\n") in similar()
