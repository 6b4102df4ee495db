"""The plain-Python pipeline end to end on real files and the tiny checkpoint."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from mess_ai.audio import WindowSpec, discover_audio, window_bounds
from mess_ai.errors import ModelUnavailableError
from mess_ai.features.loading import get_model, load_model
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import ExtractionSession, FileCounts, run_extraction, run_extraction_async
from mess_ai.store import DONE, FAILED, FeatureStore, check_store, load_npy
from tests.helpers.audio import (
    tone,
    write_audio,
    write_empty,
    write_header_only,
    write_nonfinite_wav,
    write_not_audio,
)

SR = 24000


def make_folder(root):
    """Good files of several formats, rates and lengths, plus deliberately bad ones."""
    good = {
        "a/mono44k.wav": dict(seconds=7.0, sample_rate=44100, frequency=330),
        "a/stereo48k.flac": dict(seconds=5.0, sample_rate=48000, channels=2, subtype="PCM_24", frequency=550),
        "b/mono16k.ogg": dict(seconds=6.2, sample_rate=16000, frequency=220),
        "b/stereo22k.mp3": dict(seconds=4.0, sample_rate=22050, channels=2, frequency=660),
        "c/short_2s.wav": dict(seconds=2.0, sample_rate=24000, subtype="FLOAT", frequency=440),
        "c/exact_10s_8k.wav": dict(seconds=10.0, sample_rate=8000, frequency=300),
        "c/hires96k.wav": dict(seconds=3.0, sample_rate=96000, channels=2, subtype="PCM_24", frequency=880),
    }
    for name, kwargs in good.items():
        write_audio(root / name, **kwargs)
    write_empty(root / "bad/empty.wav")
    write_not_audio(root / "bad/text.wav")
    write_header_only(root / "bad/header_only.wav")
    write_nonfinite_wav(root / "bad/nan.wav")
    write_audio(root / "bad/too_short.wav", seconds=0.4, sample_rate=24000)
    return good


def config(model, **kwargs):
    return ExtractConfig(model=model, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("run")
    audio, store = root / "audio", root / "store"
    make_folder(audio)
    summary = run_extraction(audio, store, dataset="ds", config=config(tiny_model, batch_size=3))
    return audio, store, summary


def test_good_files_done_bad_files_recorded(extracted):
    audio, store, summary = extracted
    assert (summary.discovered, summary.done, summary.failed) == (12, 7, 5)
    assert summary.exit_code == 1
    failures = {f.relative_path: f for f in summary.failures}
    assert failures["bad/empty.wav"].stage == "validate" and "empty" in failures["bad/empty.wav"].reason
    assert failures["bad/text.wav"].stage == "validate"
    assert failures["bad/header_only.wav"].stage == "validate"
    assert failures["bad/nan.wav"].stage == "preprocess" and "non-finite" in failures["bad/nan.wav"].reason
    assert failures["bad/too_short.wav"].stage == "validate" and "too short" in failures["bad/too_short.wav"].reason
    fs = FeatureStore(store, "ds")
    rows = fs.manifest.rows_by_track("ds")
    for source in discover_audio(audio):
        row = rows[source.track_id]
        assert row["relative_path"] == source.relative
        assert row["status"] == (FAILED if source.relative.startswith("bad/") else DONE)
        assert row["attempts"] == 1 and row["sha256"] and row["config_key"]
        if row["status"] == FAILED:
            assert row["permanent"] and row["error_message"] and row["failure_stage"]
            assert not fs.path("segments", source.track_id).exists()
    fs.close()
    assert check_store(store).ok


def test_shapes_follow_windows(extracted):
    audio, store, summary = extracted
    fs = FeatureStore(store, "ds")
    spec = WindowSpec()
    for outcome in summary.outcomes:
        if outcome.status != "done":
            continue
        n_samples = round(outcome.duration_seconds * SR)
        n_windows = len(window_bounds(n_samples, SR, spec))
        segments = load_npy(fs.path("segments", outcome.track_id))
        aggregated = load_npy(fs.path("aggregated", outcome.track_id))
        assert segments.shape == (n_windows, 3, 32) and segments.dtype == np.float32
        assert aggregated.shape == (3, 32) and aggregated.dtype == np.float32
        assert np.allclose(aggregated, segments.mean(axis=0), atol=1e-6)
        assert not fs.path("raw", outcome.track_id).exists()
    provenance = fs.read_provenance()
    assert provenance["sampling_rate"] == SR and provenance["num_hidden_states"] == 3
    assert provenance["window_seconds"] == 5.0 and provenance["hop_seconds"] == 2.5
    assert provenance["versions"]["torch"] == torch.__version__
    fs.close()


def test_expected_segments_computed_independently(tmp_path, tiny_model):
    """Decode, resample, window and run the model by hand; the stored segments must match."""
    path = write_audio(tmp_path / "audio" / "song.wav", seconds=9.3, sample_rate=44100, channels=2, seed=3)
    summary = run_extraction(tmp_path / "audio", tmp_path / "store", config=config(tiny_model))
    assert summary.done == 1
    stored = load_npy(tmp_path / "store" / "audio" / "segments" / f"{summary.outcomes[0].track_id}.npy")

    data, rate = sf.read(str(path), dtype="float64", always_2d=True)
    mono = soxr.resample(data.mean(axis=1), rate, SR, quality="HQ").astype(np.float32)
    window, hop = 5 * SR, SR * 5 // 2
    starts = list(range(0, len(mono) - window + 1, hop))
    if starts[-1] + window != len(mono):
        starts.append(len(mono) - window)
    model = load_model(tiny_model, device="cpu").model
    expected = []
    with torch.no_grad():
        for start in starts:
            x = torch.from_numpy(mono[start:start + window])[None]
            out = model(x, output_hidden_states=True)
            expected.append(torch.stack(out.hidden_states, dim=1)[0].mean(dim=1).numpy())
    expected = np.stack(expected)
    assert stored.shape == expected.shape == (len(starts), 3, 32)
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-4)


def test_rerun_unchanged_loads_no_model_and_writes_nothing(extracted):
    audio, store, first = extracted

    def snapshot():
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (store / "ds").rglob("*") if p.is_file()
                and ".locks" not in p.parts}

    before = snapshot()

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded when nothing changed")

    summary = run_extraction(audio, store, dataset="ds", config=config(first_model(extracted)),
                             model_loader=no_model)
    assert summary.model_loaded is False
    assert (summary.unchanged, summary.done, summary.failed, summary.previously_failed) == (7, 0, 0, 5)
    assert snapshot() == before


def first_model(extracted):
    _, store, _ = extracted
    return FeatureStore(store, "ds").read_provenance()["model"]


def test_changed_bytes_reextract_only_that_file(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    for i in range(3):
        write_audio(audio / f"t{i}.wav", seconds=3.0, frequency=200 + 100 * i)
    run_extraction(audio, tmp_path / "store", config=config(tiny_model))
    seg_dir = tmp_path / "store" / "audio" / "segments"
    mtimes = {p.name: p.stat().st_mtime_ns for p in seg_dir.iterdir()}
    time.sleep(0.01)
    write_audio(audio / "t1.wav", seconds=3.0, frequency=999)  # same name and size, new bytes
    summary = run_extraction(audio, tmp_path / "store", config=config(tiny_model))
    assert (summary.done, summary.unchanged) == (1, 2)
    done = [o for o in summary.outcomes if o.status == "done"]
    assert [o.relative_path for o in done] == ["t1.wav"]
    changed = {p.name for p in seg_dir.iterdir() if p.stat().st_mtime_ns != mtimes[p.name]}
    assert changed == {f"{done[0].track_id}.npy"}


def test_long_mp3s_decoded_before_the_block_fix_are_extracted_again_once(tmp_path, tiny_model):
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "long.mp3", seconds=35.0, sample_rate=44100, seed=1)
    write_audio(audio / "short.mp3", seconds=5.0, sample_rate=44100, seed=2)
    write_audio(audio / "long.wav", seconds=35.0, seed=3)
    assert run_extraction(audio, store, config=config(tiny_model)).done == 3
    feature_store = FeatureStore(store, "audio")
    try:
        assert {r["decoder_revision"] for r in feature_store.manifest.rows("audio")} == {2}
        with feature_store.manifest.engine.begin() as conn:  # as a store extracted before the fix has them
            conn.exec_driver_sql("UPDATE tracks SET decoder_revision = NULL")
    finally:
        feature_store.close()
    again = run_extraction(audio, store, config=config(tiny_model))
    assert (again.done, again.unchanged) == (1, 2)
    assert [o.relative_path for o in again.outcomes if o.status == "done"] == ["long.mp3"]
    assert run_extraction(audio, store, config=config(tiny_model)).unchanged == 3


def test_new_config_reextracts(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    write_audio(audio / "t.wav", seconds=8.0)
    run_extraction(audio, tmp_path / "store", config=config(tiny_model))
    summary = run_extraction(audio, tmp_path / "store", reextract=True,
                             config=config(tiny_model, window=WindowSpec(window_seconds=4.0, hop_seconds=2.0)))
    assert summary.done == 1
    segments = load_npy(tmp_path / "store" / "audio" / "segments" / f"{summary.outcomes[0].track_id}.npy")
    assert segments.shape[0] == len(window_bounds(8 * SR, SR, WindowSpec(4.0, 2.0)))
    assert check_store(tmp_path / "store").ok


def test_identical_run_to_run_and_batch_size_is_float_noise(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    for i in range(3):
        write_audio(audio / f"t{i}.wav", seconds=6.0 + 2 * i, sample_rate=44100, seed=i)
    runs = {}
    for name, batch in [("a", 4), ("b", 4), ("c", 1)]:
        run_extraction(audio, tmp_path / name, config=config(tiny_model, batch_size=batch))
        runs[name] = {p.name: load_npy(p) for p in sorted((tmp_path / name / "audio" / "segments").iterdir())}
    for name in runs["a"]:
        assert np.array_equal(runs["a"][name], runs["b"][name])
        a, c = runs["a"][name].reshape(-1, 32), runs["c"][name].reshape(-1, 32)
        cosine = (a * c).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(c, axis=1)
        assert cosine.min() >= 0.9999


def test_keep_raw(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    write_audio(audio / "t.wav", seconds=7.0, seed=1)
    write_audio(audio / "short.wav", seconds=1.5, seed=2)
    summary = run_extraction(audio, tmp_path / "store", config=config(tiny_model, keep_raw=True))
    assert summary.done == 2
    fs = FeatureStore(tmp_path / "store", "audio")
    for outcome in summary.outcomes:
        raw = load_npy(fs.path("raw", outcome.track_id))
        segments = load_npy(fs.path("segments", outcome.track_id))
        assert raw.dtype == np.float16 and raw.shape[:2] == segments.shape[:2] and raw.shape[3] == 32
        np.testing.assert_allclose(raw.astype(np.float32).mean(axis=2), segments, atol=2e-2, rtol=1e-2)
    by_name = {o.relative_path: o.track_id for o in summary.outcomes}
    assert load_npy(fs.path("raw", by_name["t.wav"])).shape == (2, 3, 374, 32)
    fs.close()
    # a store done without raw is redone when raw is asked for
    audio2 = tmp_path / "audio2"
    write_audio(audio2 / "t.wav", seconds=3.0)
    run_extraction(audio2, tmp_path / "store2", config=config(tiny_model))
    again = run_extraction(audio2, tmp_path / "store2", config=config(tiny_model, keep_raw=True))
    assert again.done == 1


class _OomAbove:
    """The real model, but raising CUDA's out-of-memory error for batches above ``limit`` (fault injection)."""

    def __init__(self, model, limit):
        self.model, self.limit = model, limit

    def __getattr__(self, name):
        return getattr(self.model, name)

    def hidden_states(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self.model.hidden_states(x)


def test_out_of_memory_halves_batch_and_goes_on(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    write_audio(audio / "t.wav", seconds=20.0, seed=4)
    loader = lambda *a, **k: _OomAbove(get_model(tiny_model, device="cpu"), 2)  # noqa: E731
    summary = run_extraction(audio, tmp_path / "s1", config=config(tiny_model, batch_size=8), model_loader=loader)
    assert summary.done == 1
    reference = run_extraction(audio, tmp_path / "s2", config=config(tiny_model, batch_size=2))
    tid = reference.outcomes[0].track_id
    a = load_npy(tmp_path / "s1" / "audio" / "segments" / f"{tid}.npy")
    b = load_npy(tmp_path / "s2" / "audio" / "segments" / f"{tid}.npy")
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_missing_model_is_a_configuration_error(tmp_path):
    write_audio(tmp_path / "audio" / "t.wav", seconds=2.0)
    with pytest.raises(ModelUnavailableError, match="does-not-exist"):
        run_extraction(tmp_path / "audio", tmp_path / "store", config=config(str(tmp_path / "does-not-exist")))


def test_missing_folder_raises(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_extraction(tmp_path / "nowhere", tmp_path / "store", config=config(tiny_model))


def test_a_track_another_run_holds_is_left_to_it(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    write_audio(audio / "held.wav", seconds=3.0)
    write_audio(audio / "free.wav", seconds=3.0, frequency=300)
    fs = FeatureStore(tmp_path / "store", "audio")
    held = [s for s in discover_audio(audio) if s.relative == "held.wav"][0]
    lock = fs.lock(held.track_id)
    lock.acquire()  # as another run would
    summary = run_extraction(audio, tmp_path / "store", config=config(tiny_model))
    outcomes = {o.relative_path: o.status for o in summary.outcomes}
    assert outcomes == {"held.wav": "busy", "free.wav": "done"}
    assert summary.busy == 1 and summary.exit_code == 0
    lock.release()
    again = run_extraction(audio, tmp_path / "store", config=config(tiny_model))
    # An unchanged file is counted, not itemised among the outcomes.
    assert {o.relative_path: o.status for o in again.outcomes} == {"held.wav": "done"} and again.unchanged == 1
    fs.close()


def test_files_a_stopped_run_did_not_reach_are_counted_as_left(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    for i in range(3):
        write_audio(audio / f"t{i}.wav", seconds=2.0, frequency=300 + 50 * i)
    session = ExtractionSession(tmp_path / "store", "audio", config(tiny_model))
    try:
        pending = session.plan(session.discover(audio))
        assert session.counts() == FileCounts(discovered=3, left=3)  # all to do
        jobs = session.preprocess(session.validate(pending))
        session.extract(itertools.islice(jobs, 1))  # stopped after the first file (an error, a time limit)
        jobs.close()
        summary = session.summary(audio, 1.0, [])
    finally:
        session.close()
    assert (summary.discovered, summary.done, summary.left) == (3, 1, 2)
    assert sum(count for _, count in summary.counts.categories()) == 3
    assert summary.counts.describe() == "3 found = 1 done (extracted now) + 0 failed now + 2 left for the next run " \
                                       "(stopped early)"


def test_async_variant(tmp_path, tiny_model):
    import asyncio

    write_audio(tmp_path / "audio" / "t.wav", seconds=2.0)
    summary = asyncio.run(run_extraction_async(tmp_path / "audio", tmp_path / "store", config=config(tiny_model)))
    assert summary.done == 1 and summary.exit_code == 0


def test_bf16_autocast_path_runs_on_cpu(tmp_path, tiny_model):
    """The CUDA precision path (bf16 autocast) exercised on the CPU: taken, recorded, and a key of its own.

    How close bf16 comes to fp32 is checked at MERT's size below: with the tiny random model (hidden 32) the gap
    depends on the CPU (cosine 0.85 where Intel AMX runs real bf16 kernels, > 0.99 where bf16 is emulated)."""
    write_audio(tmp_path / "audio" / "t.wav", seconds=6.0, seed=5)
    fp32 = run_extraction(tmp_path / "audio", tmp_path / "a", config=config(tiny_model, precision="fp32"))
    bf16 = run_extraction(tmp_path / "audio", tmp_path / "b", config=config(tiny_model, precision="bf16"))
    assert fp32.done == bf16.done == 1
    tid = fp32.outcomes[0].track_id
    a = load_npy(tmp_path / "a" / "audio" / "segments" / f"{tid}.npy")
    b = load_npy(tmp_path / "b" / "audio" / "segments" / f"{tid}.npy")
    assert a.shape == b.shape and np.isfinite(b).all() and not np.array_equal(a, b)  # another path was taken
    assert FeatureStore(tmp_path / "b", "audio").read_provenance()["precision"] == "bf16"
    assert config(tiny_model, precision="bf16").key() != config(tiny_model, precision="fp32").key()


@pytest.fixture(scope="module")
def base_size_model(tmp_path_factory):
    """A random-weight checkpoint of MERT-v1-95M's size (12 layers x 768): ~380 MB, written once per module."""
    from mess_ai.features.random_checkpoints import write_test_model

    return write_test_model(tmp_path_factory.mktemp("mert-base"), size="base", seed=0)


def test_bf16_is_close_to_fp32_at_mert_size(base_size_model):
    """bf16 autocast vs fp32 on one 5 s window, per hidden state, at the real model's width and depth.

    Measured on an Intel Xeon with AMX (real bf16 kernels): cosine >= 0.99999 on every layer. 0.999 leaves two
    orders of magnitude of margin for other CPUs (AMD AVX2 emulates bf16 with fp32 arithmetic and comes closer)."""
    from mess_ai.features.extractor import Extractor

    model = load_model(str(base_size_model), device="cpu")
    signal = soxr.resample(tone(5.0, 44100, frequency=220.0)[:, 0], 44100, model.sampling_rate).astype(np.float32)
    rng = np.random.default_rng(0)
    signal += 0.05 * rng.standard_normal(len(signal)).astype(np.float32)  # broadband, not a pure tone
    windows = signal[None, :model.sampling_rate * 5]
    fp32, _ = Extractor(model, windows.shape[1], precision="fp32").embed(windows)
    bf16, _ = Extractor(model, windows.shape[1], precision="bf16").embed(windows)
    assert fp32.shape == bf16.shape == (1, 13, 768)
    a, b = fp32[0], bf16[0]  # [13, 768]: each hidden state's mean over the window's frames
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.999, cosine
    assert not np.array_equal(a, b)


def test_short_files_one_batch_finishes_are_recorded_done_in_one_manifest_write(tmp_path, tiny_model, monkeypatch):
    from mess_ai.store import Manifest

    for i in range(6):  # one 5 s window each: three files share each batch of 3
        write_audio(tmp_path / "audio" / f"clip{i}.wav", seconds=5.0, sample_rate=SR, frequency=300 + 40 * i)
    groups = []
    real = Manifest.mark_done_many

    def recording(self, dataset, done, release_claims=()):
        groups.append(len(done))
        return real(self, dataset, done, release_claims)

    monkeypatch.setattr(Manifest, "mark_done_many", recording)
    summary = run_extraction(tmp_path / "audio", tmp_path / "store", config=config(tiny_model, batch_size=3),
                             decode_workers=0)
    assert summary.done == 6
    assert groups == [3, 3]  # not six writes of one
    assert check_store(tmp_path / "store").ok


def test_a_track_costs_the_manifest_two_reads_and_two_transactions_of_its_own(tmp_path, tiny_model, monkeypatch):
    """Reads and writes by key, each once: the row read once the track is held (for the check that it is still to
    do and for its attempt's record) and once in the transaction that records the attempt, the claim written; the
    tracks a batch finishes are recorded done, and their claims deleted, in one transaction for the batch."""
    from sqlalchemy import event

    from mess_ai.store import Manifest

    tracks = 8
    for i in range(tracks):  # one 5 s window each: each batch of 4 finishes 4 tracks at once
        write_audio(tmp_path / "audio" / f"clip{i}.wav", seconds=5.0, sample_rate=SR, frequency=300 + 40 * i)
    statements, commits = [], []
    real_init = Manifest.__init__

    def counting_init(self, url):
        real_init(self, url)
        event.listen(self.engine, "before_cursor_execute",
                     lambda conn, cursor, statement, *rest: statements.append(" ".join(statement.split()[:3])))
        event.listen(self.engine, "commit", lambda conn: commits.append(conn))

    monkeypatch.setattr(Manifest, "__init__", counting_init)
    summary = run_extraction(tmp_path / "audio", tmp_path / "store", config=config(tiny_model, batch_size=4),
                             decode_workers=0)
    assert summary.done == tracks
    row_reads = [s for s in statements if s.startswith("SELECT tracks.") and "count(" not in s]
    # per track: 2 (was 3 before the row read under the lock was kept for the attempt's record); per run: the
    # plan's read of the dataset, the integrity check's read of the run's tracks, and one spare
    assert len(row_reads) <= 2 * tracks + 3, row_reads
    # per track: its claim and its attempt's record; per batch of 4: one; per run: the dataset's record and spares
    assert len(commits) <= 2 * tracks + tracks // 4 + 4, len(commits)
