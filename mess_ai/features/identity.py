"""The model's identity, computed without loading it: which weights produce the numbers, for the content key and the
provenance record. A local checkpoint is named by the sha256 of its files, a hub id by the commit its revision
resolves to. Hashing a MERT-v1-95M checkpoint takes most of a second, so weight digests are cached by file stat
identity, in this process and in a small file shared by processes. huggingface_hub is imported inside the functions
that use it, so fingerprinting a local checkpoint stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from mess_ai.errors import ModelUnavailableError
from mess_ai.features.checkpoint import (
    CONFIG_FILE,
    PREPROCESSOR_FILE,
    TORCH_BIN_FILE,
    first_line,
    local_dir,
    unavailable_message,
)
from mess_ai.store.atomic import atomic_write_json

logger = logging.getLogger(__name__)

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
    directory = local_dir(name_or_path)
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
        reason = (f"the hub did not resolve it ({first_line(hub_error)}) and it is not in the Hugging Face cache "
                  f"({constants.HF_HUB_CACHE})")
    raise ModelUnavailableError(unavailable_message(repo_id, revision, reason))


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


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory that a download fetches, in a stable order."""
    return sorted(directory.glob("*.safetensors")) + [path for path in [directory / TORCH_BIN_FILE] if path.is_file()]


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
