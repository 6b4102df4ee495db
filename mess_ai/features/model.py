"""Load MERT-v1 once per process, and write MERT-format checkpoints with RANDOM weights for tests.

MERT-v1's own hub code breaks on transformers >= 4.48 (on 5.x it returns no hidden states), so a checkpoint whose
``config.json`` says ``model_type: "mert_model"`` is loaded natively: its config is mapped onto transformers'
``HubertConfig`` and its weights into ``HubertModel``, which is MERT-v1 minus the CQT front end and DeepNorm. The load
is strict (every checkpoint tensor used, every parameter provided, shapes equal), so a checkpoint ``HubertModel``
cannot reproduce is refused instead of running with randomly initialised layers.

``write_test_model`` writes a checkpoint in MERT-v1's on-disk format whose weights are RANDOM: its embeddings mean
nothing. It exists so tests and demos run without network; its ``config.json`` carries a marker that makes loading it
log a warning.

transformers, huggingface_hub and safetensors are imported inside the functions that use them: importing
transformers takes seconds, and ``model_fingerprint`` must stay cheap for callers that never load the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mess_ai.errors import ModelError, ModelUnavailableError, UnsupportedCheckpointError
from mess_ai.store.atomic import atomic_target, atomic_write_json

if TYPE_CHECKING:
    from transformers import HubertConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "m-a-p/MERT-v1-95M"

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_BIN_FILE = "pytorch_model.bin"
RANDOM_WEIGHTS_MARKER = "mess_ai_random_weights"
MERT_MODEL_TYPE = "mert_model"

# Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm adds this to the variance; MERT was trained behind that extractor.
_NORM_EPSILON = 1e-7

# MERT config fields that have a HubertConfig field of the same name and meaning. A field absent from config.json
# falls back to HubertConfig's default, which equals MERTConfig's default for every field listed here.
_HUBERT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout",
    "activation_dropout",
    "attention_dropout",
    "feat_proj_layer_norm",
    "feat_proj_dropout",
    "final_dropout",
    "layerdrop",
    "initializer_range",
    "layer_norm_eps",
    "feat_extract_norm",
    "feat_extract_activation",
    "conv_dim",
    "conv_stride",
    "conv_kernel",
    "conv_bias",
    "num_conv_pos_embeddings",
    "num_conv_pos_embedding_groups",
    "conv_pos_batch_norm",
    "do_stable_layer_norm",
    "apply_spec_augment",
    "mask_time_prob",
    "mask_time_length",
    "mask_time_min_masks",
    "mask_feature_prob",
    "mask_feature_length",
    "mask_feature_min_masks",
)

# MERT switches HubertModel has no equivalent for. DeepNorm keeps every parameter name and shape, so only this check
# catches it; CQT features would also fail the strict key check, but this says why. MERT's `attention_relax` is not
# here: MERT reads it only inside its DeepNorm encoder, and even there it subtracts each row's maximum logit before
# the softmax, which leaves the softmax unchanged.
_REFUSED_SWITCHES = {
    "feature_extractor_cqt": "MERT then appends CQT features to the convolutional features, which HubertModel "
                             "cannot compute",
    "deepnorm": "MERT then scales every residual connection (DeepNorm), which HubertModel does not do",
}

# torch's weight_norm parametrization names for the legacy `weight_g` / `weight_v` tensors MERT checkpoints store.
_WEIGHT_NORM_NAMES = {"weight_g": "original0", "weight_v": "original1"}

_TEST_MODEL_SIZES: dict[str, dict[str, Any]] = {
    "base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "conv_dim": [512] * 7,
        "num_conv_pos_embeddings": 128,
        "num_conv_pos_embedding_groups": 16,
    },
    # MERT's convolution kernels and strides are kept, so 5 s at 24 kHz still gives 374 frames.
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": [32] * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
    },
}


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device to run on: ``auto`` picks cuda, then mps, then cpu; an explicit device must be usable."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"Device {device!r} was asked for, but CUDA is not available to torch {torch.__version__}.")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelError(f"Device {device!r} was asked for, but only {torch.cuda.device_count()} CUDA device(s) "
                             f"are visible.")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelError(f"Device {device!r} was asked for, but MPS is not available to torch {torch.__version__}.")
    elif resolved.type != "cpu":
        raise ValueError(f"Unsupported device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return resolved


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode on ``device``, with what it expects of its input and what it gives back."""

    model: torch.nn.Module
    name: str
    revision: str | None
    device: torch.device
    sampling_rate: int
    do_normalize: bool
    num_hidden_states: int
    hidden_size: int
    source_dir: Path

    def prepare(self, windows: torch.Tensor) -> torch.Tensor:
        """Model input for ``windows``: float32 [batch, samples] at ``sampling_rate`` -> float32 [batch, samples].

        Does what the checkpoint's Wav2Vec2FeatureExtractor does: when ``do_normalize``, each window separately to zero
        mean and unit (population) variance; otherwise nothing. The result is on ``device``.
        """
        if windows.ndim != 2:
            raise ValueError(f"windows must be [batch, samples]; got shape {tuple(windows.shape)}.")
        values = windows.to(device=self.device, dtype=torch.float32)
        if not self.do_normalize:
            return values
        mean = values.mean(dim=1, keepdim=True)
        variance = values.var(dim=1, keepdim=True, correction=0)
        return (values - mean) / torch.sqrt(variance + _NORM_EPSILON)

    def hidden_states(self, input_values: torch.Tensor) -> torch.Tensor:
        """Every layer's output: input_values float32 [batch, samples] on ``device`` ->
        float32 [batch, num_hidden_states, frames, hidden_size] (index 0 is the input to the first transformer layer).
        """
        with torch.inference_mode():
            output = self.model(input_values, output_hidden_states=True)
            states = getattr(output, "hidden_states", None)
            if states is None:
                raise ModelError(f"Model {self.name} returned no hidden states; it cannot give per-layer features.")
            if len(states) != self.num_hidden_states:
                raise ModelError(f"Model {self.name} returned {len(states)} hidden states; its config promises "
                                 f"{self.num_hidden_states}.")
            return torch.stack(states, dim=1)


def load_model(name_or_path: str = DEFAULT_MODEL, revision: str | None = None, device: str = "auto", *,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a model from a local directory or the Hugging Face hub, ready for inference on ``device``.

    MERT-v1 checkpoints load natively into ``HubertModel`` (no remote code); other model types go through
    ``AutoModel``, running the repository's code only when ``trust_remote_code`` is set.
    """
    target = resolve_device(device)
    source_dir = _local_dir(name_or_path) or _download(name_or_path, revision, trust_remote_code)
    config = _read_json(source_dir / CONFIG_FILE, name_or_path, revision)
    preprocessor = _read_json(source_dir / PREPROCESSOR_FILE, name_or_path, revision)
    sampling_rate = preprocessor.get("sampling_rate", config.get("sample_rate"))
    if sampling_rate is None:
        raise UnsupportedCheckpointError(f"{source_dir}: neither {PREPROCESSOR_FILE} ('sampling_rate') nor "
                                         f"{CONFIG_FILE} ('sample_rate') says which sampling rate the model expects.")
    if config.get(RANDOM_WEIGHTS_MARKER):
        logger.warning("Model %s has RANDOM weights (written by write_test_model): its features mean nothing.",
                       name_or_path)

    started = time.perf_counter()
    if config.get("model_type") == MERT_MODEL_TYPE:
        model = _load_mert(source_dir, config, name_or_path, revision)
    else:
        model = _load_auto(source_dir, trust_remote_code)
    _check_takes_raw_audio(model, source_dir)
    model = model.float().to(target).eval().requires_grad_(False)
    logger.info("Loaded model %s from %s on %s in %.1f s.", name_or_path, source_dir, target,
                time.perf_counter() - started)
    return LoadedModel(
        model=model,
        name=name_or_path,
        revision=revision,
        device=target,
        sampling_rate=int(sampling_rate),
        # Wav2Vec2FeatureExtractor's own default, for a preprocessor config that does not say.
        do_normalize=bool(preprocessor.get("do_normalize", True)),
        num_hidden_states=model.config.num_hidden_layers + 1,
        hidden_size=model.config.hidden_size,
        source_dir=source_dir,
    )


_MODEL_CACHE: dict[tuple[str, str | None, str, bool], tuple[str, LoadedModel]] = {}
# Prefect runs tasks in threads: without the lock two tasks could each load the model.
_MODEL_CACHE_LOCK = threading.Lock()


def get_model(name_or_path: str = DEFAULT_MODEL, revision: str | None = None, device: str = "auto", *,
              trust_remote_code: bool = False) -> LoadedModel:
    """``load_model``, once per process: later calls with the same arguments return the same ``LoadedModel``.

    A local checkpoint whose files changed since it was loaded (another ``model_fingerprint``) is loaded again.
    """
    key = (name_or_path, revision, str(resolve_device(device)), trust_remote_code)
    fingerprint = model_fingerprint(name_or_path, revision)
    with _MODEL_CACHE_LOCK:
        cached = _MODEL_CACHE.get(key)
        if cached is None or cached[0] != fingerprint:
            _MODEL_CACHE[key] = (fingerprint, load_model(name_or_path, revision, device,
                                                         trust_remote_code=trust_remote_code))
        return _MODEL_CACHE[key][1]


def clear_model_cache() -> None:
    """Forget every model ``get_model`` loaded, so the next call loads again."""
    with _MODEL_CACHE_LOCK:
        _MODEL_CACHE.clear()


CACHE_DIR_ENV = "MESS_AI_CACHE_DIR"
_DIGEST_CACHE_FILE = "weights-sha256.json"
# Enough for every checkpoint version a machine keeps around; the file stays a few tens of kB.
_DIGEST_CACHE_ENTRIES = 512
_HASH_BLOCK_BYTES = 1 << 20
# File timestamps advance in ticks (a few ms on Linux, up to 2 s on some network and FAT file systems): a file changed
# less than this before it was read could change again within the same tick and keep its stat identity.
_TIMESTAMP_SLACK_NS = 2 * 10**9
_HUB_TIMEOUT_SECONDS = 5.0
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# sha256 of weight files by stat identity: get_model fingerprints the checkpoint on every call, and hashing a
# MERT-v1-95M checkpoint takes most of a second.
_WEIGHT_DIGESTS: dict[str, str] = {}
_WEIGHT_DIGESTS_LOCK = threading.Lock()
_DIGEST_FILE_LOCK = threading.Lock()


def model_fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """The identity of the weights that produce the numbers, computed without loading the model: stored features
    are still valid exactly while it is unchanged. See ``model_identity``."""
    return model_identity(name_or_path, revision)["fingerprint"]


def model_identity(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """Which checkpoint ``name_or_path`` at ``revision`` is, for the content key and the provenance record.

    ``fingerprint``: for a local directory ``"sha256:<hex>"`` over its config files' bytes and its weight files'
    names and bytes; for a hub id ``"<id>@<commit sha>"`` (``resolve_hub_revision``). ``resolved_revision``: that
    commit sha, None for a local directory. ``weights_sha256``: ``{weight file name: sha256 of its bytes}`` for a
    local directory, None for a hub id (the commit pins the bytes).
    """
    directory = _local_dir(name_or_path)
    if directory is None:
        commit = resolve_hub_revision(name_or_path, revision)
        return {"fingerprint": f"{name_or_path}@{commit}", "resolved_revision": commit, "weights_sha256": None}
    records: list[list[Any]] = []
    for name in (CONFIG_FILE, PREPROCESSOR_FILE):
        path = directory / name
        records.append([name, hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None])
    weights = {path.name: _weights_sha256(path) for path in _weight_files(directory)}
    records.extend([name, digest] for name, digest in weights.items())
    return {"fingerprint": "sha256:" + hashlib.sha256(json.dumps(records).encode()).hexdigest(),
            "resolved_revision": None, "weights_sha256": weights}


def resolve_hub_revision(repo_id: str, revision: str | None = None) -> str:
    """The commit sha that ``revision`` (a branch, tag or commit; None means ``main``) of hub model ``repo_id``
    stands for now, without downloading anything.

    A 40-hex revision is a commit already. Otherwise, unless HF_HUB_OFFLINE is set, the hub is asked; when it cannot
    answer, or offline, the ref the Hugging Face cache recorded at the last download is used, which is the snapshot
    an offline load would read. Neither: ``ModelUnavailableError``.
    """
    from huggingface_hub import constants

    if revision is not None and _COMMIT_SHA.fullmatch(revision):
        return revision
    hub_error = None
    if not constants.HF_HUB_OFFLINE:
        from huggingface_hub import HfApi

        try:
            commit = HfApi().model_info(repo_id, revision=revision, timeout=_HUB_TIMEOUT_SECONDS).sha
        # No network, a time-out, an unknown id or revision, a gated repository: the cache may still know it.
        except Exception as exc:
            hub_error = exc
        else:
            if commit is not None and _COMMIT_SHA.fullmatch(commit):
                return commit
    commit = _cached_hub_revision(repo_id, revision)
    if commit is not None:
        return commit
    if hub_error is None:
        reason = f"HF_HUB_OFFLINE is set and it is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    else:
        reason = (f"the hub did not resolve it ({_first_line(hub_error)}) and it is not in the Hugging Face cache "
                  f"({constants.HF_HUB_CACHE})")
    raise ModelUnavailableError(_unavailable_message(repo_id, revision, reason))


def _cached_hub_revision(repo_id: str, revision: str | None) -> str | None:
    """The commit the Hugging Face cache's ref file ``refs/<revision or 'main'>`` of ``repo_id`` names, or None."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.file_download import repo_folder_name

    try:
        refs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs"
    except HFValidationError:
        return None
    ref = refs / (revision or "main")
    if not ref.resolve().is_relative_to(refs.resolve()):
        return None
    try:
        commit = ref.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if _COMMIT_SHA.fullmatch(commit) else None


def _weights_sha256(path: Path) -> str:
    """sha256 of a weight file's bytes, hashed only when its stat identity is new to this process and to the
    cache file (``weights_digest_cache_path``)."""
    identity = _stat_identity(os.stat(path))
    with _WEIGHT_DIGESTS_LOCK:
        digest = _WEIGHT_DIGESTS.get(identity)
    if digest is not None:
        return digest
    digest = _read_digest_cache().get(identity)
    if digest is None:
        digest, identity = _hash_file(path)
        if identity is None:
            return digest
        _add_to_digest_cache(identity, digest)
    with _WEIGHT_DIGESTS_LOCK:
        _WEIGHT_DIGESTS[identity] = digest
    return digest


def _stat_identity(stat: os.stat_result) -> str:
    """Which version of a file this is: an in-place rewrite changes the ctime, which no copy tool can set back."""
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


def _hash_file(path: Path) -> tuple[str, str | None]:
    """sha256 of the file's bytes, and the stat identity they belong to: None when the file changed while it was
    read, or so shortly before that a further change could keep its timestamps (which are coarse)."""
    started_ns = time.time_ns()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        before = os.fstat(fh.fileno())
        for block in iter(lambda: fh.read(_HASH_BLOCK_BYTES), b""):
            digest.update(block)
        after = os.fstat(fh.fileno())
    identity = _stat_identity(before)
    settled = before.st_ctime_ns <= started_ns - _TIMESTAMP_SLACK_NS
    return digest.hexdigest(), identity if settled and _stat_identity(after) == identity else None


def weights_digest_cache_path() -> Path:
    """The file that remembers weight digests across processes: under ``$MESS_AI_CACHE_DIR``, else
    ``~/.cache/mess-ai``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "mess-ai") / _DIGEST_CACHE_FILE


def _read_digest_cache() -> dict[str, str]:
    """The cache file's ``{stat identity: sha256}``, oldest first; empty when it is missing or unreadable (it is only a
    cache)."""
    try:
        content = json.loads(weights_digest_cache_path().read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    entries = content.get("sha256_by_stat") if isinstance(content, dict) else None
    if not isinstance(entries, list):
        return {}
    return {entry[0]: entry[1] for entry in entries
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], str)
            and _SHA256.fullmatch(entry[1])}


def _add_to_digest_cache(identity: str, digest: str) -> None:
    """Add one digest to the cache file, keeping the newest ``_DIGEST_CACHE_ENTRIES``; failures are ignored."""
    with _DIGEST_FILE_LOCK:
        digests = _read_digest_cache()
        digests.pop(identity, None)
        digests[identity] = digest
        entries = [[known, sha] for known, sha in digests.items()][-_DIGEST_CACHE_ENTRIES:]
        try:
            atomic_write_json(weights_digest_cache_path(), {"sha256_by_stat": entries})
        except OSError as exc:
            logger.debug("Cannot write the weight digest cache %s: %s", weights_digest_cache_path(), exc)


def mert_config(size: str = "tiny") -> dict[str, Any]:
    """``config.json`` of a MERT-v1 checkpoint: ``base`` has MERT-v1-95M's shape, ``tiny`` the same front end
    (75 frames/s at 24 kHz) with width 32 and 2 layers. The other values are MERT-v1-95M's."""
    if size not in _TEST_MODEL_SIZES:
        raise ValueError(f"Unknown test model size {size!r}; expected one of {sorted(_TEST_MODEL_SIZES)}.")
    return {
        "model_type": MERT_MODEL_TYPE,
        "architectures": ["MERTModel"],
        "auto_map": {"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
        "feature_extractor_cqt": False,
        "feature_extractor_cqt_bins": 336,
        "deepnorm": False,
        "attention_relax": -1.0,
        "sample_rate": 24000,
        "vocab_size": 32,
        "hidden_act": "gelu",
        "hidden_dropout": 0.1,
        "activation_dropout": 0.1,
        "attention_dropout": 0.1,
        "feat_proj_layer_norm": True,
        "feat_proj_dropout": 0.0,
        "final_dropout": 0.1,
        "layerdrop": 0.1,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "feat_extract_norm": "group",
        "feat_extract_activation": "gelu",
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_bias": False,
        "conv_pos_batch_norm": False,
        "num_feat_extract_layers": 7,
        "do_stable_layer_norm": False,
        "apply_spec_augment": True,
        "mask_time_prob": 0.05,
        "mask_time_length": 10,
        "mask_time_min_masks": 2,
        "mask_feature_prob": 0.0,
        "mask_feature_length": 10,
        "mask_feature_min_masks": 0,
        "use_weighted_layer_sum": False,
        "classifier_proj_size": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        **_TEST_MODEL_SIZES[size],
    }


def hubert_config(mert: dict[str, Any]) -> HubertConfig:
    """The transformers ``HubertConfig`` equivalent to a MERT-v1 ``config.json`` (the MERT-only fields dropped)."""
    from transformers import HubertConfig

    return HubertConfig(**{field: mert[field] for field in _HUBERT_FIELDS if field in mert})


def write_test_model(directory: str | Path, size: str = "tiny", seed: int = 0, weights_format: str = "safetensors",
                     overrides: dict[str, Any] | None = None) -> Path:
    """Write a MERT-v1-format checkpoint with RANDOM weights into ``directory``; returns the directory.

    The weights are random (deterministic for ``seed``): the model runs like MERT but its features mean nothing.
    Files: ``config.json`` (``mert_config(size)`` plus ``overrides`` and the random-weights marker),
    ``preprocessor_config.json``, and the weights under MERT's key names (legacy ``weight_g``/``weight_v``) as
    ``model.safetensors`` or, with ``weights_format="bin"``, ``pytorch_model.bin``. ``tiny`` is well under 1 MB;
    ``base`` is MERT-v1-95M's size (~380 MB).
    """
    if weights_format not in ("safetensors", "bin"):
        raise ValueError(f"Unknown weights_format {weights_format!r}; expected 'safetensors' or 'bin'.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**mert_config(size), **(overrides or {}), RANDOM_WEIGHTS_MARKER: True}
    preprocessor = {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": config["sample_rate"],
        "do_normalize": False,
        "padding_value": 0.0,
        "padding_side": "right",
        "return_attention_mask": True,
    }
    tensors = _random_mert_weights(mert_config(size), seed)
    atomic_write_json(directory / CONFIG_FILE, config)
    atomic_write_json(directory / PREPROCESSOR_FILE, preprocessor)
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        with atomic_target(directory / SAFETENSORS_FILE) as temporary:
            save_file(tensors, str(temporary), metadata={"format": "pt"})
    else:
        with atomic_target(directory / TORCH_BIN_FILE) as temporary:
            torch.save(tensors, temporary)
    return directory


def _local_dir(name_or_path: str) -> Path | None:
    """The directory ``name_or_path`` names, or None when it is a hub id; a path that is not a directory raises."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists():
        reason = "it is not a directory" if path.exists() else "no such directory"
        raise ModelUnavailableError(_unavailable_message(name_or_path, None, reason))
    return None


def _download(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    """The hub snapshot of ``repo_id`` (from the local cache when offline), holding only what loading needs."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = [CONFIG_FILE, PREPROCESSOR_FILE, "*.safetensors", TORCH_BIN_FILE]
    if trust_remote_code:
        patterns.append("*.py")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    # Offline mode, no network, an unknown id or revision, a gated repository, a malformed id: for the user all of
    # them mean the same thing, and the message below says how to fix it.
    except Exception as exc:
        if constants.HF_HUB_OFFLINE:
            reason = f"HF_HUB_OFFLINE is set and it is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        elif isinstance(exc, LocalEntryNotFoundError):
            reason = (f"the hub cannot be reached ({_first_line(exc)}) and it is not in the "
                      f"Hugging Face cache ({constants.HF_HUB_CACHE})")
        else:
            reason = _first_line(exc)
        raise ModelUnavailableError(_unavailable_message(repo_id, revision, reason)) from None


def _unavailable_message(name_or_path: str, revision: str | None, reason: str) -> str:
    """One message saying which model is missing, why, and the three ways to make it available."""
    looks_like_hub_id = not Path(name_or_path).expanduser().is_absolute() and not name_or_path.startswith((".", "~"))
    hub_id = name_or_path if looks_like_hub_id else DEFAULT_MODEL
    named = f"{name_or_path} (revision {revision or 'main'})" if looks_like_hub_id else name_or_path
    download = f"hf download {hub_id}" + (f" --revision {revision}" if revision else "")
    return (f"Model {named} is not available: {reason.rstrip('.')}. To make it "
            f"available: download it where there is network (`{download}`); or copy that Hugging Face cache here "
            f"and set HF_HUB_OFFLINE=1; or pass a local directory holding {CONFIG_FILE}, {PREPROCESSOR_FILE} and "
            f"the weights (`--model /path/to/{hub_id.rsplit('/', 1)[-1]}`).")


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: hub errors run to several lines of advice that ours replaces."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _read_json(path: Path, name_or_path: str, revision: str | None) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict; a missing file means the model is not (fully) available."""
    if not path.is_file():
        raise ModelUnavailableError(_unavailable_message(name_or_path, revision, f"{path} is missing"))
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedCheckpointError(f"{path}: cannot be read as JSON ({_first_line(exc)}).") from None
    if not isinstance(content, dict):
        raise UnsupportedCheckpointError(f"{path}: expected a JSON object, found {type(content).__name__}.")
    return content


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory that a download fetches, in a stable order."""
    return sorted(directory.glob("*.safetensors")) + [path for path in [directory / TORCH_BIN_FILE] if path.is_file()]


def _load_mert(source_dir: Path, config: dict[str, Any], name_or_path: str, revision: str | None) -> torch.nn.Module:
    """A MERT-v1 checkpoint as transformers' HubertModel, refusing anything HubertModel would compute differently."""
    from transformers import HubertModel

    config_path = source_dir / CONFIG_FILE
    for switch, why in _REFUSED_SWITCHES.items():
        if config.get(switch):
            raise UnsupportedCheckpointError(f"{config_path}: {switch} is {json.dumps(config[switch])}; {why}, so "
                                             f"this checkpoint cannot be loaded without MERT's own code.")
    weights_path = next((path for path in (source_dir / SAFETENSORS_FILE, source_dir / TORCH_BIN_FILE)
                         if path.is_file()), None)
    if weights_path is None:
        raise ModelUnavailableError(_unavailable_message(
            name_or_path, revision, f"{source_dir} has neither {SAFETENSORS_FILE} nor {TORCH_BIN_FILE}"))
    try:
        hubert = hubert_config(config)
    except (TypeError, ValueError) as exc:
        raise UnsupportedCheckpointError(f"{config_path}: not a valid HuBERT configuration ({_first_line(exc)}).") \
            from None
    model = HubertModel(hubert)
    expected = model.state_dict()
    state = _rename_weight_norm(_read_weights(weights_path), expected.keys())
    _check_weights_fit(state, expected, weights_path)
    model.load_state_dict(state, strict=True)
    return model


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``pytorch_model.bin`` file, by name, on the CPU."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            # weights_only: a checkpoint is data, and plain unpickling would run whatever code the file holds.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip each raise their own errors for a damaged file
        raise UnsupportedCheckpointError(f"{path}: cannot read the weights ({_first_line(exc)}).") from None
    if not isinstance(state, dict) or not all(isinstance(tensor, torch.Tensor) for tensor in state.values()):
        raise UnsupportedCheckpointError(f"{path}: expected a flat mapping of names to tensors.")
    return state


def _rename_weight_norm(state: dict[str, torch.Tensor], model_keys: Any) -> dict[str, torch.Tensor]:
    """``state`` with legacy ``<module>.weight_g``/``weight_v`` renamed to the model's weight_norm parametrization
    names (``<module>.parametrizations.weight.original0``/``original1``) where the model uses them."""
    model_keys = set(model_keys)
    renamed = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        parametrized = f"{module}.parametrizations.weight.{_WEIGHT_NORM_NAMES.get(leaf)}"
        renamed[parametrized if leaf in _WEIGHT_NORM_NAMES and parametrized in model_keys else key] = tensor
    return renamed


def _check_weights_fit(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], weights_path: Path) -> None:
    """Raise unless ``state`` provides exactly the model's tensors, each with the model's shape."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
                        for key in state.keys() & expected.keys() if state[key].shape != expected[key].shape)
    problems = [f"{len(keys)} {what} ({_preview(keys)})"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", mismatched))
                if keys]
    if problems:
        raise UnsupportedCheckpointError(f"{weights_path}: the weights do not fit transformers' HubertModel built "
                                         f"from {CONFIG_FILE}: " + "; ".join(problems) + ".")


def _preview(keys: list[str], shown: int = 5) -> str:
    """The first few keys, and how many more there are."""
    more = f", and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _load_auto(source_dir: Path, trust_remote_code: bool) -> torch.nn.Module:
    """A non-MERT checkpoint through transformers' AutoModel."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(str(source_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UnsupportedCheckpointError(f"{source_dir}: transformers cannot load this model "
                                         f"({_first_line(exc)}).") from None


def _check_takes_raw_audio(model: torch.nn.Module, source_dir: Path) -> None:
    """Refuse a model that does not take a raw waveform and give hidden states of a known size (a text or image
    model that AutoModel can build would otherwise fail on every file, or describe the wrong model)."""
    input_name = getattr(model, "main_input_name", None)
    config = getattr(model, "config", None)
    if input_name != "input_values" or not hasattr(config, "num_hidden_layers") or not hasattr(config,
                                                                                               "hidden_size"):
        kind = type(model).__name__
        raise UnsupportedCheckpointError(
            f"{source_dir}: {kind} is not an audio model that takes a raw waveform (its input is "
            f"{input_name!r}, not 'input_values'); mess-ai extracts MERT-style hidden states from audio.")


def _random_mert_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under MERT-v1's key names for ``config``: float32, deterministic for ``seed``.

    The names and shapes come from a HubertModel built on the meta device (no memory, no init cost), with the
    weight-norm parametrization renamed back to the legacy ``weight_g``/``weight_v`` that MERT checkpoints store.
    Norm gains and weight-norm magnitudes sit around 1, matrices are scaled by 1/sqrt(fan_in), vectors around 0;
    no tensor equals a default initialisation, so a tensor the loader failed to copy shows.
    """
    from transformers import HubertModel

    legacy_names = {f"parametrizations.weight.{new}": old for old, new in _WEIGHT_NORM_NAMES.items()}
    with torch.device("meta"):
        shapes = {key: tensor.shape for key, tensor in HubertModel(hubert_config(config)).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in sorted(shapes):
        name = next((key.replace(new, old) for new, old in legacy_names.items() if key.endswith(new)), key)
        shape = shapes[key]
        noise = torch.randn(shape, generator=generator)
        if name.endswith(("layer_norm.weight", ".weight_g")):
            tensors[name] = 1.0 + 0.1 * noise
        else:
            # 1/sqrt(fan_in) keeps each layer's output on the scale of its input.
            tensors[name] = noise * (shape[1:].numel() ** -0.5 if len(shape) >= 2 else 0.1)
    return tensors

