"""Tests of mess_ai.features.identity: the model fingerprint names the weights that produce the numbers, by content
or by hub commit, and get_model reloads exactly when it changes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants
import pytest

import mess_ai.features.identity as identity_module
from mess_ai.errors import ModelUnavailableError
from mess_ai.features.checkpoint import DEFAULT_MODEL
from mess_ai.features.identity import (
    CACHE_DIR_ENV,
    model_fingerprint,
    model_identity,
    resolve_hub_revision,
    weights_digest_cache_path,
)
from mess_ai.features.loading import clear_model_cache, get_model
from mess_ai.features.random_checkpoints import write_test_model

COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"
# Long past a local file system's timestamp tick, short enough to wait for in a test.
SLACK_NS = 200_000_000


@pytest.fixture(autouse=True)
def private_digest_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test starts with no digest known, in this process or in the cache file."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mess-ai-cache"))
    monkeypatch.setattr(identity_module, "_WEIGHT_DIGESTS", {})
    return weights_digest_cache_path()


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The weight files read for hashing, in order."""
    calls: list[Path] = []
    real = identity_module._hash_file

    def counting(path: Path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(identity_module, "_hash_file", counting)
    return calls


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub read both variables when it was imported; the calls read these module attributes.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _set_ref(cache: Path, folder: str, ref: str, commit: str) -> None:
    path = cache / folder / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(commit)


def _settled(directory: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``directory`` once its weights are old enough for their digest to be cached (with a short slack)."""
    monkeypatch.setattr(identity_module, "_TIMESTAMP_SLACK_NS", SLACK_NS)
    age_ns = time.time_ns() - (directory / "model.safetensors").stat().st_ctime_ns
    time.sleep(max(0, SLACK_NS - age_ns) / 1e9 + 0.05)
    return directory


# --- local checkpoints: the fingerprint follows the bytes --------------------------------------------------------

def test_touching_the_weights_keeps_the_fingerprint(tmp_path: Path) -> None:
    directory = write_test_model(tmp_path / "model")
    before = model_fingerprint(str(directory))

    os.utime(directory / "model.safetensors", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))

    assert model_fingerprint(str(directory)) == before


def test_same_size_rewrite_with_restored_mtime_changes_the_fingerprint(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       hash_calls: list[Path]) -> None:
    directory = _settled(write_test_model(tmp_path / "model", seed=0), monkeypatch)
    other = write_test_model(tmp_path / "other", seed=1) / "model.safetensors"
    weights = directory / "model.safetensors"
    before = model_fingerprint(str(directory))
    assert model_fingerprint(str(directory)) == before and len(hash_calls) == 1  # cached: the test is meaningful
    old = weights.stat()
    inode, size, mtime_ns = old.st_ino, old.st_size, old.st_mtime_ns

    # cp -p, then the old mtime back: same inode, same size, same mtime, other bytes.
    shutil.copy2(other, weights)
    os.utime(weights, ns=(old.st_atime_ns, mtime_ns))

    new = weights.stat()
    assert (new.st_ino, new.st_size, new.st_mtime_ns) == (inode, size, mtime_ns)
    assert model_fingerprint(str(directory)) != before
    assert model_fingerprint(str(directory)) == model_fingerprint(str(other.parent))


def test_config_change_changes_the_fingerprint(tmp_path: Path) -> None:
    directory = write_test_model(tmp_path / "model")
    before = model_fingerprint(str(directory))

    write_test_model(directory, overrides={"layer_norm_eps": 1e-6})

    assert model_fingerprint(str(directory)) != before


def test_identity_names_each_weight_file_digest(tmp_path: Path) -> None:
    directory = write_test_model(tmp_path / "model", weights_format="bin")

    identity = model_identity(str(directory))

    digest = hashlib.sha256((directory / "pytorch_model.bin").read_bytes()).hexdigest()
    assert identity == {"fingerprint": model_fingerprint(str(directory)), "resolved_revision": None,
                        "weights_sha256": {"pytorch_model.bin": digest}}
    assert identity["fingerprint"].startswith("sha256:")


def test_a_settled_digest_is_hashed_once_and_kept_in_the_cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    private_digest_cache: Path,
                                                                    hash_calls: list[Path]) -> None:
    directory = _settled(write_test_model(tmp_path / "model"), monkeypatch)
    weights = directory / "model.safetensors"

    first = model_fingerprint(str(directory))
    assert model_fingerprint(str(directory)) == first
    assert hash_calls == [weights]
    stat = weights.stat()
    identity = f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert json.loads(private_digest_cache.read_text()) == {"sha256_by_stat": [[identity, digest]]}

    monkeypatch.setattr(identity_module, "_WEIGHT_DIGESTS", {})  # a new process: only the cache file remembers
    assert model_fingerprint(str(directory)) == first
    assert hash_calls == [weights]


def test_freshly_written_weights_are_hashed_until_they_settle(tmp_path: Path, private_digest_cache: Path,
                                                              hash_calls: list[Path]) -> None:
    # Written within the timestamp slack, a file could be rewritten again without its stat identity changing.
    directory = write_test_model(tmp_path / "model")

    assert model_fingerprint(str(directory)) == model_fingerprint(str(directory))

    assert len(hash_calls) == 2
    assert not private_digest_cache.exists()


def test_an_unusable_cache_file_is_only_a_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _settled(write_test_model(tmp_path / "model"), monkeypatch)
    expected = model_fingerprint(str(directory))
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocker))
    monkeypatch.setattr(identity_module, "_WEIGHT_DIGESTS", {})

    assert model_fingerprint(str(directory)) == expected  # cannot be written

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "weights-sha256.json").write_text('{"sha256_by_stat": [["x", "not a digest"]], "oops"')
    monkeypatch.setenv(CACHE_DIR_ENV, str(garbage))
    monkeypatch.setattr(identity_module, "_WEIGHT_DIGESTS", {})

    assert model_fingerprint(str(directory)) == expected  # cannot be read: rewritten
    assert len(json.loads((garbage / "weights-sha256.json").read_text())["sha256_by_stat"]) == 1


def test_get_model_reloads_after_a_same_size_rewrite_but_not_after_a_touch(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _settled(write_test_model(tmp_path / "model", seed=0), monkeypatch)
    other = write_test_model(tmp_path / "other", seed=1) / "model.safetensors"
    weights = directory / "model.safetensors"
    clear_model_cache()
    try:
        first = get_model(str(directory), device="cpu")
        os.utime(weights, ns=(time.time_ns(), time.time_ns()))
        assert get_model(str(directory), device="cpu") is first

        mtime_ns = weights.stat().st_mtime_ns
        shutil.copy2(other, weights)
        os.utime(weights, ns=(mtime_ns, mtime_ns))
        second = get_model(str(directory), device="cpu")
    finally:
        clear_model_cache()

    assert second is not first
    assert not all(a.equal(b) for a, b in zip(first.model.state_dict().values(),
                                              second.model.state_dict().values()))


def _rewrite_weights(directory: Path, seed: int) -> None:
    before = (directory / "model.safetensors").stat().st_mtime_ns
    write_test_model(directory, seed=seed)
    # A filesystem with coarse timestamps could give the rewrite the old mtime; a real replacement comes later.
    os.utime(directory / "model.safetensors", ns=(before + 10**9, before + 10**9))


def test_model_fingerprint_follows_the_files(tmp_path: Path) -> None:
    directory = write_test_model(tmp_path)
    first = model_fingerprint(str(directory))

    assert model_fingerprint(str(directory)) == first
    _rewrite_weights(directory, seed=1)
    second = model_fingerprint(str(directory))
    assert second != first
    write_test_model(directory, seed=1, overrides={"layer_norm_eps": 1e-6})
    assert model_fingerprint(str(directory)) not in (first, second)


def test_model_fingerprint_is_cheap_and_names_hub_commits(tiny_model: str) -> None:
    started = time.perf_counter()
    for _ in range(50):
        model_fingerprint(tiny_model)

    assert (time.perf_counter() - started) / 50 < 0.005
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert model_fingerprint(DEFAULT_MODEL, commit) == f"m-a-p/MERT-v1-95M@{commit}"  # the commit, not "main"


def test_get_model_reloads_a_changed_checkpoint(tmp_path: Path) -> None:
    directory = write_test_model(tmp_path)
    clear_model_cache()
    first = get_model(str(directory), device="cpu")

    _rewrite_weights(directory, seed=1)

    assert get_model(str(directory), device="cpu") is not first
    clear_model_cache()


# --- hub ids: the fingerprint names the commit -------------------------------------------------------------------

def test_hub_id_resolves_main_from_the_cache_and_follows_it(hub_cache: Path) -> None:
    _set_ref(hub_cache, "models--org--name", "main", COMMIT_A + "\n")

    assert model_fingerprint("org/name") == f"org/name@{COMMIT_A}"
    assert model_identity("org/name") == {"fingerprint": f"org/name@{COMMIT_A}", "resolved_revision": COMMIT_A,
                                          "weights_sha256": None}

    _set_ref(hub_cache, "models--org--name", "main", COMMIT_B)

    assert model_fingerprint("org/name") == f"org/name@{COMMIT_B}"


def test_hub_tag_resolves_through_its_own_ref(hub_cache: Path) -> None:
    _set_ref(hub_cache, "models--org--name", "main", COMMIT_A)
    _set_ref(hub_cache, "models--org--name", "v1.0", COMMIT_B)

    assert resolve_hub_revision("org/name", "v1.0") == COMMIT_B


def test_commit_revision_is_used_as_is(hub_cache: Path) -> None:
    assert not hub_cache.exists()

    assert model_fingerprint("org/name", COMMIT_B) == f"org/name@{COMMIT_B}"


@pytest.mark.parametrize("revision", [None, "v1.0", "abc123"])
def test_hub_id_missing_offline_is_unavailable(hub_cache: Path, revision: str | None) -> None:
    _set_ref(hub_cache, "models--org--other", "main", COMMIT_A)

    with pytest.raises(ModelUnavailableError) as caught:
        model_fingerprint("org/name", revision)

    message = str(caught.value)
    assert f"org/name (revision {revision or 'main'})" in message
    assert "HF_HUB_OFFLINE" in message and str(hub_cache) in message


def test_online_hub_answer_wins_and_an_error_falls_back_to_the_cache(hub_cache: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked = []
    answers = [SimpleNamespace(sha=COMMIT_B), ConnectionError("no route to host\nmore advice")]

    def model_info(self, repo_id, revision=None, timeout=None, **kwargs):
        asked.append((repo_id, revision, timeout))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    _set_ref(hub_cache, "models--org--name", "main", COMMIT_A)

    assert resolve_hub_revision("org/name") == COMMIT_B
    assert resolve_hub_revision("org/name") == COMMIT_A
    assert [(repo_id, revision) for repo_id, revision, _ in asked] == [("org/name", None)] * 2
    assert all(timeout is not None and timeout <= 10 for _, _, timeout in asked)

    answers.append(ConnectionError("no route to host"))
    with pytest.raises(ModelUnavailableError, match=r"org/name \(revision v2\).*ConnectionError: no route to host"):
        resolve_hub_revision("org/name", "v2")
