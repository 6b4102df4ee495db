"""Security: no pickle on any load path, no remote code unless asked for, hostile file names cannot escape the
store, symlinks out of the root are never followed, servers listen on loopback only."""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from mess_ai.audio import discover_audio, make_track_id
from mess_ai.errors import UnsupportedCheckpointError
from mess_ai.features.loading import clear_model_cache, load_model
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import run_extraction
from mess_ai.store import FeatureStore, check_dataset_name, check_store, load_npy
from tests.helpers.audio import write_audio
from tests.helpers.prefect_server import make_server_start_lines

REPO = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = ("mess_ai", "flows", "tasks", "deployments", "bench")


# --- no pickle on any load path ------------------------------------------------------------------------------

_FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
_FORBIDDEN_CALLS = {"read_pickle", "unsafe_load", "full_load"}
_FORBIDDEN_BUILTINS = {"eval", "exec"}  # as bare names: ``module.eval()`` is torch's eval mode


def unsafe_loads(source: str) -> list[str]:
    """Each place in ``source`` that could unpickle (or run) data: pickle-family imports, ``np.load`` without
    ``allow_pickle=False``, ``torch.load`` without ``weights_only=True``, ``allow_pickle=True`` or
    ``trust_remote_code=True`` anywhere, ``persist_result=True`` (Prefect pickles persisted results),
    ``yaml.load`` without ``SafeLoader``, ``read_pickle``, ``eval``/``exec``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in _FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in _FORBIDDEN_MODULES or (module in ("numpy", "torch") and any(a.name == "load"
                                                                                   for a in node.names)):
                found.append(f"{line}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords}

            def constant(key):
                value = keywords.get(key)
                return value.value if isinstance(value, ast.Constant) else "<not a constant>"

            if name in _FORBIDDEN_CALLS or (isinstance(func, ast.Name) and name in _FORBIDDEN_BUILTINS):
                found.append(f"{line}: {owner + '.' if owner else ''}{name}(...)")
            if name == "load" and owner in ("np", "numpy") and constant("allow_pickle") is not False:
                found.append(f"{line}: {owner}.load without allow_pickle=False")
            if name == "load" and owner == "torch" and constant("weights_only") is not True:
                found.append(f"{line}: torch.load without weights_only=True")
            loader = ast.unparse(keywords.get("Loader", ast.Constant("")))
            if name == "load" and owner == "yaml" and "Safe" not in loader:
                found.append(f"{line}: yaml.load without SafeLoader")
            for key in ("allow_pickle", "trust_remote_code", "persist_result"):
                if key in keywords and constant(key) is True:
                    found.append(f"{line}: {key}=True")
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = """
import pickle
from numpy import load
import numpy as np, torch, yaml
np.load("x.npy")
np.load("x.npy", allow_pickle=True)
torch.load("w.bin")
yaml.load(text)
model.from_pretrained(path, trust_remote_code=True)
@task(persist_result=True)
def t(): pass
eval("1")
"""
    assert len(unsafe_loads(bad)) == 10
    assert unsafe_loads("model.eval()") == []
    good = """
import numpy as np, torch, yaml
np.load("x.npy", allow_pickle=False, mmap_mode="r")
torch.load(path, map_location="cpu", weights_only=True)
yaml.safe_load(text)
model.from_pretrained(path, trust_remote_code=trust_remote_code)
"""
    assert unsafe_loads(good) == []


def test_no_load_path_can_unpickle():
    files = [p for folder in SOURCE_FOLDERS if (REPO / folder).is_dir() for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 20
    found = {str(p.relative_to(REPO)): unsafe_loads(p.read_text(encoding="utf-8")) for p in files}
    assert {path: hits for path, hits in found.items() if hits} == {}


def test_prefect_tasks_persist_no_pickled_results():
    from prefect import Flow, Task
    from prefect.cache_policies import NO_CACHE

    import flows.extract
    import tasks.extraction

    modules = [tasks.extraction, flows.extract]
    for name in ("tasks.reporting", "tasks.analysis", "flows.analyze", "flows.scale"):
        try:
            modules.append(__import__(name, fromlist=["_"]))
        except ImportError:
            pass
    seen = 0
    for module in modules:
        for name, obj in vars(module).items():
            if isinstance(obj, Task) and obj.__module__ == module.__name__:
                seen += 1
                assert obj.cache_policy is NO_CACHE and obj.persist_result is not True, name
            if isinstance(obj, Flow) and obj.__module__ == module.__name__:
                seen += 1
                assert obj.persist_result is not True, name
    assert seen >= 7


class _RunsCode:
    """Unpickling this runs ``open(marker, 'w')``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plant_pickle(path, marker):
    """Overwrite a feature file with a pickled object array whose unpickling would create ``marker``."""
    with open(path, "wb") as fh:
        np.save(fh, np.array([_RunsCode(marker)], dtype=object), allow_pickle=True)


@pytest.fixture
def extracted(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    for i in range(3):
        write_audio(audio / f"t{i}.wav", seconds=2.0, seed=i)
    summary = run_extraction(audio, tmp_path / "store", config=ExtractConfig(model=tiny_model, device="cpu"))
    assert summary.done == 3
    return audio, tmp_path / "store", sorted(o.track_id for o in summary.outcomes)


@pytest.mark.parametrize("scale", ["segments", "aggregated"])
def test_pickled_feature_file_is_refused_by_check(extracted, tmp_path, scale):
    _, store, track_ids = extracted
    marker = tmp_path / "pwned"
    path = store / "audio" / scale / f"{track_ids[1]}.npy"
    _plant_pickle(path, marker)
    report = check_store(store)
    assert [(p.track_id, p.path) for p in report.problems] == [(track_ids[1], str(path))]
    assert re.search(r"unreadable: .*(allow_pickle|Python objects)", report.problems[0].reason)
    quick = check_store(store, check_values=False)
    assert [p.path for p in quick.problems] == [str(path)]
    with pytest.raises(ValueError):
        load_npy(path)
    assert not marker.exists(), "reading the store ran code from a feature file"


def test_pickled_feature_file_is_replaced_by_the_next_run(extracted, tmp_path, tiny_model):
    audio, store, track_ids = extracted
    marker = tmp_path / "pwned"
    _plant_pickle(store / "audio" / "segments" / f"{track_ids[0]}.npy", marker)
    summary = run_extraction(audio, store, config=ExtractConfig(model=tiny_model, device="cpu"))
    assert {o.track_id: o.status for o in summary.outcomes}[track_ids[0]] == "done"
    assert load_npy(store / "audio" / "segments" / f"{track_ids[0]}.npy").dtype == np.float32
    assert check_store(store).ok and not marker.exists()


def test_pickled_feature_file_is_refused_by_the_analysis(extracted, tmp_path):
    loading = pytest.importorskip("mess_ai.analysis.loading")
    _, store, track_ids = extracted
    marker = tmp_path / "pwned"
    _plant_pickle(store / "audio" / "aggregated" / f"{track_ids[2]}.npy", marker)
    with pytest.raises(ValueError):
        loading.load_dataset_features(store, "audio")
    assert not marker.exists()


# --- no remote code unless asked for ---------------------------------------------------------------------------

def test_remote_code_is_off_by_default_everywhere():
    from flows.extract import extract_features
    from cli.main import build_parser

    assert ExtractConfig().trust_remote_code is False
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    assert inspect.signature(extract_features.fn).parameters["config"].default.trust_remote_code is False
    args = build_parser().parse_args(["extract", "folder", "--store", "store"])
    assert args.config_trust_remote_code is None  # not given: the config's default, False


def _checkpoint_with_code(folder, marker):
    """A local checkpoint whose config points at code of its own; importing that code creates ``marker``."""
    folder.mkdir()
    code = f"open({str(marker)!r}, 'w').close()\nfrom transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 24000}))
    return folder


def test_checkpoint_code_is_not_run_unless_asked_for(tmp_path):
    marker = tmp_path / "code-ran"
    model = _checkpoint_with_code(tmp_path / "evil", marker)
    clear_model_cache()
    with pytest.raises(UnsupportedCheckpointError):
        load_model(str(model), device="cpu")
    assert not marker.exists(), "the checkpoint's own code ran without trust_remote_code"
    with pytest.raises(Exception):  # asked for: the code runs (and this fake model then fails to build)
        load_model(str(model), device="cpu", trust_remote_code=True)
    assert marker.exists()


def test_hub_download_fetches_no_code_unless_asked_for(tmp_path, tiny_model, monkeypatch):
    import huggingface_hub

    patterns = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        patterns.append(list(allow_patterns))
        return tiny_model

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    clear_model_cache()
    load_model("m-a-p/MERT-v1-95M", device="cpu")
    load_model("m-a-p/MERT-v1-95M", device="cpu", trust_remote_code=True)
    assert not any(p.endswith(".py") for p in patterns[0])
    assert "*.py" in patterns[1]


# --- hostile file names cannot escape the store --------------------------------------------------------------

HOSTILE = [
    "../../etc/passwd.wav", "/etc/passwd.wav", "a/../../b.wav", "..", ".", "", "-rf.wav", "--help", "-",
    "~/.ssh/id_rsa.wav", "..\\..\\windows\\system32.wav", "x\x00y.wav", "new\nline.wav", "tab\there.wav",
    "$(rm -rf ~).wav", "`id`.wav", "a;b|c&d>e.wav", "%2e%2e%2fetc.wav", "\u202egnp.wav", "Cafe\u0301.wav",
    "Café.wav", "🎵" * 200 + ".wav", "a" * 1000 + ".wav", "a/" * 200 + "deep.wav", os.fsdecode(b"\xff\xfe.wav"),
    " .wav", "_.wav", "___---___.wav", "CON.wav", "nul", "'; DROP TABLE tracks;--.wav",
]
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


def _random_names(n, seed=0):
    rng = np.random.default_rng(seed)
    alphabet = [chr(c) for c in range(1, 0x3000) if not 0xD800 <= c <= 0xDFFF] + ["/", ".", "..", "-", "\\"] * 50
    return ["".join(rng.choice(alphabet, size=int(rng.integers(1, 40)))) for _ in range(n)]


def test_track_ids_from_hostile_names_stay_inside_the_store(tmp_path):
    fs = FeatureStore(tmp_path / "store", "ds")
    names = HOSTILE + _random_names(2000)
    ids = {}
    for name in names:
        track_id = make_track_id(name)
        assert _SAFE_ID.fullmatch(track_id), (name, track_id)
        for scale in ("raw", "segments", "aggregated"):
            path = fs.path(scale, track_id)
            assert path.parent == tmp_path / "store" / "ds" / scale and path.resolve().parent == path.parent
        ids.setdefault(unicodedata.normalize("NFC", name), set()).add(track_id)
    fs.close()
    # One id per name (NFC and NFD spellings of a name are one name), and different names never share one.
    assert all(len(v) == 1 for v in ids.values())
    assert len({next(iter(v)) for v in ids.values()}) == len(ids)


@pytest.mark.parametrize("name", ["..", ".", "../evil", "a/b", ".hidden", "-x", "", "x" * 101, "a\x00b", "é"])
def test_hostile_dataset_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError):
        check_dataset_name(name)
    with pytest.raises(ValueError):
        FeatureStore(tmp_path / "store", name)
    assert not (tmp_path / "evil").exists()


# --- symlinks out of the root are never followed ----------------------------------------------------------------

def _root_with_escapes(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_audio(root / "inside.wav", seconds=0.5)
    write_audio(outside / "secret.wav", seconds=0.5)
    write_audio(outside / "dir" / "deep.wav", seconds=0.5)
    os.symlink(outside / "secret.wav", root / "escape.wav")
    os.symlink("../outside/secret.wav", root / "escape_relative.wav")
    os.symlink(outside / "dir", root / "linked_out")
    (root / "sub").mkdir()
    os.symlink("../../outside/dir", root / "sub" / "up_and_out")
    os.symlink(root / "escape.wav", root / "chain.wav")  # a link to a link that leaves
    os.symlink(root, root / "sub" / "loop")
    return root, outside


def test_discovery_never_follows_symlinks_out_of_the_root(tmp_path):
    root, _ = _root_with_escapes(tmp_path)
    assert [s.relative for s in discover_audio(root)] == ["inside.wav"]


def test_watcher_never_follows_symlinks_out_of_the_root(tmp_path):
    watcher = pytest.importorskip("mess_ai.watcher")
    from watchfiles import Change

    root, outside = _root_with_escapes(tmp_path)
    now = [0.0]
    batcher = watcher.StableBatcher(root, stable_seconds=1.0, debounce_seconds=1.0, clock=lambda: now[0])
    events = [root / "inside.wav", root / "escape.wav", root / "escape_relative.wav", root / "chain.wav",
              root / "linked_out", root / "linked_out" / "deep.wav", root / "sub" / "up_and_out" / "deep.wav",
              outside / "secret.wav", root / "sub"]
    batcher.feed({(Change.added, str(path)) for path in events})
    batcher.rescan()
    now[0] = 10.0
    assert batcher.poll() == ["inside.wav"]


# --- servers listen on loopback only ---------------------------------------------------------------------------

def test_prefect_server_and_runner_default_to_loopback():
    from prefect.settings.models.runner import RunnerServerSettings
    from prefect.settings.models.server.api import ServerAPISettings

    assert ServerAPISettings.model_fields["host"].default == "127.0.0.1"
    assert RunnerServerSettings.model_fields["host"].default == "localhost"
    assert RunnerServerSettings.model_fields["enable"].default is False


def test_provided_server_configs_bind_loopback():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^HOST \?= 127\.0\.0\.1$", makefile, re.M)
    for path in [REPO / "Makefile", REPO / "prefect.yaml", *sorted((REPO / "deployments").glob("*.py"))]:
        if path.exists():
            text = path.read_text()
            assert "0.0.0.0" not in text and "--host ::" not in text, path
    starts = make_server_start_lines()
    if starts is not None:  # make installed
        assert starts and all("--host 127.0.0.1" in line for line in starts), starts
