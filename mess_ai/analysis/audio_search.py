"""Similar-track search for a recording that is not in the store: embedded exactly as the dataset's own files were
(its ``provenance.json``: the same checkpoint, windows and precision, through extraction's own steps), then its
vector goes through the dataset's search index like a stored track's. The recording is not added to the store.

torch and the model are imported and loaded only when a recording is embedded, not when this module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mess_ai.analysis.loading import read_tracks
from mess_ai.analysis.preprocessing import LAYER_MEAN, Layer, check_layer, select_layer
from mess_ai.analysis.search import FAISS_MIN_TRACKS, check_k, open_index, ranked
from mess_ai.errors import MessError, ModelError, ModelUnavailableError


@dataclass(frozen=True, eq=False)
class EmbeddedRecording:
    """A recording embedded for dataset ``dataset``: ``aggregated`` float32 [n_states, hidden], the mean over its
    ``n_windows`` windows and their frames, as the store's ``aggregated`` scale; ``config_key``: the content key
    of the dataset's features it is comparable with."""

    path: Path
    dataset: str
    duration_seconds: float
    n_windows: int
    model: str
    config_key: str
    aggregated: np.ndarray


def embed_recording(store_root: str | Path, dataset: str | None, audio_path: str | Path, *,
                    manifest_url: str | None = None, device: str | None = None) -> EmbeddedRecording:
    """Embed ``audio_path`` with the model and settings dataset ``dataset`` (None: the store's only one) was
    extracted with, on ``device`` (None: auto).

    ``MessError`` when the dataset has no provenance record, or when the checkpoint its provenance names is no
    longer the one its features were made with (another file at that path, other weights: the message says which);
    ``InputError`` naming the file and the reason for a recording that cannot be used (not a file, not audio, too
    short, undecodable); ``ModelError`` when the model cannot be loaded.
    """
    from mess_ai.extraction.provenance import extraction_config, model_difference
    from mess_ai.extraction.steps import embed_file, extractor_for, load_model
    from mess_ai.features.identity import model_identity
    from mess_ai.features.loading import get_model

    dataset, _, provenance = read_tracks(store_root, dataset, manifest_url)
    if not provenance:
        raise MessError(f"dataset '{dataset}' of store {store_root} has no provenance.json, which names the model "
                        "and settings its features were made with: extract recordings into it first")
    config = extraction_config(provenance, dataset, device or "auto")
    try:
        # A hub model at the commit the features were made with, wherever its branch has moved since.
        identity = model_identity(config.model, provenance["resolved_revision"] or config.revision)
        difference = model_difference(provenance, identity)
        if difference is not None:
            raise ModelError(f"cannot embed {audio_path} for dataset '{dataset}': the model {config.model} is not "
                             f"the one its features were made with ({difference}). Put that checkpoint back, or "
                             "re-extract the dataset with this one (--reextract)")
        model = load_model(config, identity, config.precision, dataset, get_model)
    except ModelUnavailableError as exc:
        # The loader's advice ends with passing another model (--model), which a query cannot: it must use the
        # dataset's own.
        advice = str(exc).partition("; or pass a local directory")[0].rstrip(".")
        raise ModelUnavailableError(f"cannot embed {audio_path} for dataset '{dataset}' with the model its "
                                    f"provenance.json names: {advice}") from None
    job = embed_file(audio_path, config, extractor_for(model, config, config.precision))
    return EmbeddedRecording(Path(audio_path), dataset, len(job.signal) / model.sampling_rate, job.n_windows,
                             config.model, provenance["config_key"], job.aggregated())


def find_similar_to_embedding(store_root: str | Path, recording: EmbeddedRecording, k: int = 10,
                              layer: Layer = LAYER_MEAN, diverse: bool = False, *,
                              faiss_min_tracks: int = FAISS_MIN_TRACKS, manifest_url: str | None = None
                              ) -> list[dict]:
    """The ``k`` tracks of the recording's dataset most similar to it, as ``find_similar`` lists them. ValueError
    for a bad ``k`` or ``layer``, an empty dataset, or tracks extracted with another config than the recording."""
    check_k(k)
    layer = check_layer(layer, recording.aggregated.shape[0])
    dataset, tracks, _ = read_tracks(store_root, recording.dataset, manifest_url)
    other = [t.relative_path for t in tracks if t.config_key != recording.config_key]
    if other:
        raise ValueError(f"{len(other)} tracks of dataset '{dataset}' (e.g. {other[0]}) were extracted with "
                         f"another config than {recording.path} was embedded with ({recording.config_key}): embed "
                         "it again")
    index = open_index(store_root, dataset, tracks, layer, faiss_min_tracks)
    return ranked(index, index.query_vector(select_layer(recording.aggregated, layer)), k, diverse)


def find_similar_to_audio(store_root: str | Path, dataset: str | None, audio_path: str | Path, k: int = 10,
                          layer: Layer = LAYER_MEAN, diverse: bool = False, *, manifest_url: str | None = None,
                          device: str | None = None) -> list[dict]:
    """The ``k`` tracks of a dataset most similar to a recording outside it (``embed_recording``, then
    ``find_similar_to_embedding``): ``{"rank", "track_id", "relative_path", "similarity"}``, most similar first;
    a copy of a stored recording finds that track first, with a similarity of about 1."""
    check_k(k)
    recording = embed_recording(store_root, dataset, audio_path, manifest_url=manifest_url, device=device)
    return find_similar_to_embedding(store_root, recording, k, layer, diverse, manifest_url=manifest_url)
