"""``mess-ai similar --audio``: a recording outside the store, embedded as the dataset's own files were (same
checkpoint, windows and precision, through extraction's steps), finds its neighbours; another checkpoint, a store
without provenance and unusable recordings are refused with the reason."""

from __future__ import annotations

import json
import shutil

import pytest
import soundfile as sf

from cli.main import main
from mess_ai.analysis.audio_search import find_similar_to_audio
from mess_ai.errors import ModelError
from mess_ai.features.random_checkpoints import write_test_model
from mess_ai.store.layout import PROVENANCE_FILE
from tests.helpers.audio import write_audio, write_not_audio

ORIGINAL = "tones/C1.wav"


def similar(*argv) -> int:
    return main(["similar", *(str(a) for a in argv)])


def test_a_copy_of_a_stored_recording_finds_the_original_first(tone_store, tmp_path, tiny_model, capsys):
    store, dataset, _ = tone_store
    original = store.parent / "audio" / ORIGINAL
    wav = tmp_path / "elsewhere" / "copy.wav"
    wav.parent.mkdir()
    shutil.copyfile(original, wav)
    data, rate = sf.read(original, dtype="float32", always_2d=True)
    flac = write_audio(tmp_path / "elsewhere" / "copy.flac", sample_rate=rate, data=data)  # re-encoded, lossless
    stored = sorted(p.name for p in (store / dataset / "aggregated").iterdir())
    capsys.readouterr()

    for copy in (wav, flac):
        assert similar("--store", store, "--audio", copy, "-k", 3, "--json") == 0
        results = json.loads(capsys.readouterr().out)
        assert [r["rank"] for r in results] == [1, 2, 3] and results[0]["relative_path"] == ORIGINAL
        assert results[0]["similarity"] > 0.99 and results[1]["similarity"] < results[0]["similarity"]
    library = find_similar_to_audio(store, dataset, wav, k=3)
    assert [r["track_id"] for r in library] == [r["track_id"] for r in results]
    assert [r["similarity"] for r in library] == pytest.approx([r["similarity"] for r in results], abs=1e-6)
    assert find_similar_to_audio(store, None, wav, k=2, layer=1, diverse=True)[0]["relative_path"] == ORIGINAL

    assert similar("--store", store, "--audio", wav, "-k", 2) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"embedded {wav}: 3.0 s, 1 window, model {tiny_model} (as dataset '{dataset}')"
    assert out[1] == f"2 most similar tracks to {wav} (layer mean, cosine of centred embeddings):"
    assert out[2].startswith("    1. +1.000  tones/C1.wav  [") and len(out) == 4
    # The recordings were not added to the store.
    assert sorted(p.name for p in (store / dataset / "aggregated").iterdir()) == stored


def test_another_checkpoint_or_no_provenance_is_refused(tone_store, tmp_path, tiny_model, capsys):
    store = tmp_path / "store"
    shutil.copytree(tone_store[0], store)
    query = store.parent.parent / "query.wav"
    shutil.copyfile(tone_store[0].parent / "audio" / ORIGINAL, query)
    provenance_path = store / "tones" / PROVENANCE_FILE
    provenance = json.loads(provenance_path.read_text())
    other = write_test_model(tmp_path / "other-model", seed=1)  # the same shape, other weights
    provenance_path.write_text(json.dumps({**provenance, "model": str(other)}))
    capsys.readouterr()

    assert similar("--store", store, "--audio", query) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mess-ai: error: cannot embed {query} for dataset 'tones': the model {other} is not the "
                          f"one its features were made with (model.safetensors: sha256 ")
    assert "when the features were made). Put that checkpoint back, or re-extract" in err
    with pytest.raises(ModelError, match="is not the one its features were made with"):
        find_similar_to_audio(store, "tones", query)

    # A hub model that is not here (no network): what to do, without the loader's advice to pass --model.
    commit = "0" * 40
    provenance_path.write_text(json.dumps({**provenance, "model": "m-a-p/MERT-v1-95M", "resolved_revision": commit,
                                           "model_fingerprint": f"m-a-p/MERT-v1-95M@{commit}",
                                           "weights_sha256": None}))
    assert similar("--store", store, "--audio", query) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mess-ai: error: cannot embed {query} for dataset 'tones' with the model its "
                          f"provenance.json names: Model m-a-p/MERT-v1-95M (revision {commit}) is not available")
    assert "hf download m-a-p/MERT-v1-95M" in err and "--model" not in err

    provenance_path.unlink()
    assert similar("--store", store, "--audio", query) == 2
    assert f"dataset 'tones' of store {store} has no provenance.json" in capsys.readouterr().err


def test_unusable_recordings_exit_2_naming_the_file_and_the_reason(tone_store, tmp_path, capsys):
    store = tone_store[0]
    (tmp_path / "folder.wav").mkdir()
    reasons = {
        write_audio(tmp_path / "short.wav", seconds=0.5): "too short: 0.50 s, the minimum is 1.00 s",
        write_not_audio(tmp_path / "notes.wav"): "not an audio file libsndfile can decode",
        tmp_path / "folder.wav": "not a regular file (a directory)",
    }
    capsys.readouterr()
    for path, reason in reasons.items():
        assert similar("--store", store, "--audio", path) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mess-ai: error: {path}: {reason}"), err
    assert similar("--store", store, "--audio", tmp_path / "missing.wav") == 2
    err = capsys.readouterr().err
    assert "No such file or directory" in err and str(tmp_path / "missing.wav") in err


def test_a_track_and_a_recording_together_or_neither_is_a_usage_error(tmp_path, capsys):
    for argv in (["--store", tmp_path, "some_track", "--audio", tmp_path / "a.wav"], ["--store", tmp_path]):
        with pytest.raises(SystemExit) as exit_info:
            similar(*argv)
        assert exit_info.value.code == 2 and "--audio" in capsys.readouterr().err
