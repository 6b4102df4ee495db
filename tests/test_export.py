"""The Parquet export of a store the real pipeline wrote: read back by pyarrow, Hugging Face datasets, pandas, polars
and DuckDB; incremental re-export (only the parts of changed tracks are rewritten); the ``mess-ai export`` command."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from cli.main import main
from mess_ai.export import INDEX_FILE, METADATA_KEY, export_parquet, part_count, part_of
from mess_ai.store.reader import open_store
from tests.helpers.audio import write_audio, write_not_audio
from tests.helpers.windowed import (
    DATASET,
    DURATIONS,
    SAMPLE_RATE,
    done_rows,
    extract,
    windowed_store,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model):
    return windowed_store(tmp_path_factory.mktemp("export"), tiny_model)


def _table(folder, name):
    return pads.dataset(folder / name, format="parquet").to_table().sort_by([("track_id", "ascending")] + (
        [("window_index", "ascending")] if name == "windows" else []))


def _vectors(table, column):
    return np.stack(table.column(column).to_numpy(zero_copy_only=False))


def test_export_reads_back_with_pyarrow_as_the_store_holds_it(store, tmp_path):
    summary = export_parquet(store, tmp_path / "out")
    folder = tmp_path / "out" / DATASET
    rows = done_rows(store)
    assert (summary.tracks, summary.windows) == (len(rows), sum(r["n_windows"] for r in rows))
    assert summary.kept == () and summary.removed == () and summary.files == 2 * len(summary.written)
    reader = open_store(store)
    tracks, windows = _table(folder, "tracks"), _table(folder, "windows")
    assert tracks.num_rows == len(rows) and windows.num_rows == sum(r["n_windows"] for r in rows)
    assert tracks.column_names == ["track_id", "relative_path", "source_path", "sha256", "duration_seconds",
                                   "n_windows", "model", "config_key", "layer_0", "layer_1", "layer_2"]
    assert windows.column_names == ["track_id", "window_index", "start_seconds", "end_seconds",
                                    "layer_0", "layer_1", "layer_2"]
    assert str(tracks.schema.field("layer_1").type) == "fixed_size_list<element: float>[32]"
    by_id = {r["track_id"]: r for r in rows}
    ids = tracks.column("track_id").to_pylist()
    assert ids == sorted(by_id)
    for field in ("relative_path", "source_path", "sha256", "duration_seconds", "n_windows", "config_key"):
        assert tracks.column(field).to_pylist() == [by_id[i][field] for i in ids]
    assert set(tracks.column("model").to_pylist()) == {reader.provenance["model"]}
    for state in range(3):
        np.testing.assert_array_equal(_vectors(tracks, f"layer_{state}"), reader.aggregated(state, ids))
        np.testing.assert_array_equal(_vectors(windows, f"layer_{state}"),
                                      np.concatenate([reader.segments(i, state) for i in ids]))
    times = np.column_stack([windows.column("start_seconds").to_numpy(), windows.column("end_seconds").to_numpy()])
    np.testing.assert_array_equal(times, np.concatenate([reader.window_times(i) for i in ids]))
    assert windows.column("window_index").to_pylist() == [k for i in ids for k in range(by_id[i]["n_windows"])]
    # Every file carries the provenance; the index says which tracks each part holds.
    index = json.loads((folder / INDEX_FILE).read_text())
    for table in ("tracks", "windows"):
        for path in (folder / table).glob("*.parquet"):
            metadata = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
            assert metadata["layer"] == "all" and metadata["provenance"] == index["provenance"]
    assert index["provenance"]["sampling_rate"] == 24000 and index["provenance"]["hop_seconds"] == 2.5
    assert index["provenance"]["weights_sha256"] == reader.provenance["weights_sha256"]
    assert sorted(i for part in index["parts"].values() for i in part["tracks"]) == ids
    assert all(index["parts"][f"part-{part_of(i, index['n_parts']):05d}"]["tracks"][i] ==
               [by_id[i]["sha256"], by_id[i]["config_key"]] for i in ids)


def test_export_loads_with_datasets_pandas_polars_and_duckdb(store, tmp_path, monkeypatch):
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    summary = export_parquet(store, tmp_path / "out", DATASET, layer="mean")
    folder = summary.folder
    rows = done_rows(store)
    n_windows = sum(r["n_windows"] for r in rows)
    reader = open_store(store)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    loaded = {name: datasets.load_dataset("parquet", data_files={"train": str(folder / name / "*.parquet")},
                                          split="train", cache_dir=str(tmp_path / "hf"))
              for name in ("tracks", "windows")}
    assert loaded["tracks"].num_rows == len(rows) and loaded["windows"].num_rows == n_windows
    assert loaded["tracks"].features["embedding"].length == 32
    # As Arrow: datasets' numpy format would hand float64 columns (the seconds) over as float32.
    tracks = loaded["tracks"].with_format("arrow")[:]
    order = [reader.track_ids.index(i) for i in tracks.column("track_id").to_pylist()]
    np.testing.assert_allclose(_vectors(tracks, "embedding"), reader.aggregated("mean")[order], rtol=1e-6)
    windows = loaded["windows"].with_format("arrow")[:].sort_by([("track_id", "ascending"),
                                                                  ("window_index", "ascending")])
    ids = sorted(reader.track_ids)
    np.testing.assert_array_equal(windows.column("start_seconds").to_numpy(),
                                  np.concatenate([reader.window_times(i)[:, 0] for i in ids]))
    np.testing.assert_allclose(_vectors(windows, "embedding"),
                               np.concatenate([reader.segments(i, "mean") for i in ids]), rtol=1e-6)

    assert pd.read_parquet(folder / "windows").shape == (n_windows, 5)
    assert pl.read_parquet(str(folder / "tracks" / "*.parquet")).shape == (len(rows), 9)
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/windows/*.parquet')").fetchall() == [(n_windows,)]


def test_a_layer_index_gives_one_embedding_column(store, tmp_path):
    summary = export_parquet(store, tmp_path / "out", layer=-1)
    assert summary.layer == 2
    tracks = _table(summary.folder, "tracks")
    assert tracks.column_names[-1] == "embedding" and "layer_0" not in tracks.column_names
    np.testing.assert_array_equal(_vectors(tracks, "embedding"),
                                  open_store(store).aggregated(2, tracks.column("track_id").to_pylist()))
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        export_parquet(store, tmp_path / "out", layer=3)
    with pytest.raises(ValueError, match="layer must be an integer hidden-state index, 'all' or 'mean'; got 'x'"):
        export_parquet(store, tmp_path / "out", layer="x")


def _stats(folder):
    """(mtime_ns, bytes) of every part file, by path relative to the export folder."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*.parquet")}


def test_re_export_rewrites_only_the_parts_whose_tracks_changed(tmp_path, tiny_model):
    audio, store, out = tmp_path / "audio", windowed_store(tmp_path, tiny_model), tmp_path / "out"
    first = export_parquet(store, out, tracks_per_part=2)
    folder = first.folder
    index = json.loads((folder / INDEX_FILE).read_text())
    assert index["n_parts"] == 4 and len(first.written) == len(index["parts"]) >= 3
    before = _stats(folder)

    again = export_parquet(store, out, tracks_per_part=2)
    assert again.written == () and again.removed == () and sorted(again.kept) == sorted(first.written)
    assert _stats(folder) == before  # not a byte touched: same sizes, same modification times

    # One file gets new audio (same length), one becomes undecodable (its row fails): re-extract, re-export.
    ids = {t.relative_path: t.track_id for t in open_store(store).tracks}
    changed, failed = ids["tail.wav"], ids["short.wav"]
    write_audio(audio / "tail.wav", seconds=DURATIONS["tail.wav"], sample_rate=SAMPLE_RATE, frequency=97.0, seed=9)
    write_not_audio(audio / "short.wav")
    summary = extract(audio, store, tiny_model, DATASET)
    assert summary.done == 1 and {f.relative_path for f in summary.failures} >= {"short.wav"}
    third = export_parquet(store, out, tracks_per_part=2)

    part = {i: f"part-{part_of(i, 4):05d}" for i in ids.values()}
    touched = {part[changed], part[failed]}
    emptied = {part[failed]} - {p for i, p in part.items() if i != failed}
    assert emptied, "the test's tracks are laid out so that the failed track was alone in its part"
    assert set(third.written) == touched - emptied and set(third.removed) == emptied
    assert set(third.kept) == set(index["parts"]) - touched
    after = _stats(folder)
    for path, stat in before.items():
        if path.split("/")[1].removesuffix(".parquet") in touched:
            assert path not in after or after[path] != stat
        else:
            assert after[path] == stat, f"{path} was rewritten although none of its tracks changed"
    reader = open_store(store)
    tracks, windows = _table(folder, "tracks"), _table(folder, "windows")
    assert tracks.column("track_id").to_pylist() == sorted(reader.track_ids) and failed not in reader.track_ids
    assert third.tracks == tracks.num_rows == len(DURATIONS) - 1
    row = tracks.column("track_id").to_pylist().index(changed)
    np.testing.assert_array_equal(_vectors(tracks, "layer_1")[row], reader.aggregated(1, [changed])[0])
    mine = np.array(windows.column("track_id").to_pylist()) == changed
    np.testing.assert_array_equal(_vectors(windows, "layer_0")[mine], reader.segments(changed, 0))
    assert failed not in windows.column("track_id").to_pylist()
    assert third.windows == windows.num_rows == sum(t.n_windows for t in reader.tracks)
    new_index = json.loads((folder / INDEX_FILE).read_text())
    assert new_index["parts"][part[changed]]["tracks"][changed][0] == reader.track(changed).sha256
    assert not [p for p in folder.rglob("*") if p.name.startswith(".part-")]  # no temporary files left


def test_the_partition_follows_the_size_of_the_dataset():
    assert part_count(0, 500, None) == 1 and part_count(500, 500, None) == 1 and part_count(501, 500, None) == 2
    assert part_count(5, 2, None) == 4
    # Within a factor of two of the last partition: kept (only changed parts rewritten); beyond: a new one.
    assert part_count(4, 2, 4) == 4 and part_count(16, 2, 4) == 4 and part_count(17, 2, 4) == 16
    assert part_count(3, 2, 4) == 4 and part_count(2, 2, 4) == 1
    with pytest.raises(ValueError, match="tracks_per_part must be at least 1, got 0"):
        part_count(5, 0, None)


def test_changing_the_layer_rewrites_every_part(store, tmp_path):
    first = export_parquet(store, tmp_path / "out", layer="all", tracks_per_part=2)
    second = export_parquet(store, tmp_path / "out", layer="mean", tracks_per_part=2)
    assert sorted(second.written) == sorted(first.written) and second.kept == ()
    assert _table(second.folder, "windows").column_names[-1] == "embedding"


def test_export_command(store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "--store", str(store), "--format", "parquet", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert f"exported dataset '{DATASET}' (5 tracks, " in line and f"to {out / DATASET}: " in line
    assert "parts written, 0 kept, 0 removed" in line
    assert main(["export", "--store", str(store), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["written"] == [] and printed["tracks"] == 5 and printed["layer"] == "all"

    for argv, message in [
        (["--store", str(tmp_path / "nowhere")], "store folder"),
        (["--store", str(store), "--dataset", "other"], "dataset 'other' does not exist in store"),
        (["--store", str(store), "--layer", "last"], "layer must be an integer hidden-state index, 'all' or "
                                                     "'mean'; got 'last'"),
        (["--store", str(store), "--layer", "7"], "layer 7 is out of range: the features have 3 hidden states"),
    ]:
        assert main(["export", *argv, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mess-ai: error: ") and message in err, err
