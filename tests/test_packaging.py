"""What an install must hold: every imported package declared in pyproject.toml, in the extra that the importing
code needs, and an extraction worker that runs without the ``analysis`` and ``export`` extras."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.audio import write_audio
from tests.helpers.flows import count_flow_runs

REPO = Path(__file__).resolve().parents[1]
ANALYSIS_CODE = REPO / "mess_ai" / "analysis"
# Extras whose packages the code imports only where the feature is used (NVML statistics, a PostgreSQL manifest,
# writing an export), so the base install runs without them.
FEATURE_EXTRAS = ("gpu", "postgres", "export")
# Their import names, for what is not installed here: the distribution cannot be looked up.
NOT_INSTALLED_HERE = {"pynvml": "nvidia-ml-py", "psycopg": "psycopg"}
# The analysis extra (and what librosa brings) and the export extra: an extraction worker has none of them.
LEFT_OUT_OF_WORKERS = ("sklearn", "matplotlib", "faiss", "librosa", "numba", "pyarrow")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, set[str]]:
    """'base' and each extra -> the distributions it declares."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = {"base": project["dependencies"], **project["optional-dependencies"]}
    return {group: {_normalized(re.match(r"[A-Za-z0-9_.-]+", r)[0]) for r in requirements}
            for group, requirements in groups.items()}


def _imported(folders: tuple[str, ...]) -> dict[str, set[Path]]:
    """Distribution -> the files under ``folders`` that import it (every import, also those inside functions),
    for what is neither the standard library's nor ours."""
    distributions = importlib.metadata.packages_distributions()
    ours = {"mess_ai", "tasks", "flows", "deployments", "cli", "tests", "bench"}
    found: dict[str, set[Path]] = {}
    for path in (p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for top in {m.split(".")[0] for m in modules} - ours - set(sys.stdlib_module_names) - {"__future__"}:
                dist = NOT_INSTALLED_HERE.get(top) or (distributions.get(top) or [None])[0]
                assert dist is not None, f"{path.relative_to(REPO)} imports {top}, which no distribution provides"
                found.setdefault(_normalized(dist), set()).add(path)
    return found


def test_every_imported_package_is_declared_in_the_extra_its_code_needs():
    declared = _declared()
    worker = declared["base"].union(*(declared[extra] for extra in FEATURE_EXTRAS))
    wrong = []
    for dist, paths in _imported(("mess_ai", "tasks", "flows", "deployments", "cli")).items():
        for path in paths:
            allowed = worker | declared["analysis"] if path.is_relative_to(ANALYSIS_CODE) else worker
            if dist not in allowed:
                wrong.append(f"{path.relative_to(REPO)} imports {dist}, not declared for it")
    everything = set().union(*declared.values())
    wrong += [f"{path.relative_to(REPO)} imports {dist}, declared nowhere"
              for dist, paths in _imported(("tests", "bench")).items() if dist not in everything for path in paths]
    assert not wrong, "\n".join(sorted(wrong))
    assert "pyyaml" in declared["base"] and "fastapi" not in declared["base"]  # the server's pins: constraints.txt


# Run in a fresh interpreter where the packages an extraction worker does not install cannot be imported.
_WORKER = """
import contextlib, io, json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError, find_spec finds nothing

def analysis_modules():
    return sorted(m for m in sys.modules if m.startswith("mess_ai.analysis"))

def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return {{"code": code, "out": out.getvalue(), "err": err.getvalue()}}

try:
    import sklearn
    blocked = False
except ImportError:
    blocked = True
from prefect.flows import load_flow_from_entrypoint  # as a worker loads a deployment's flow
for entrypoint in {entrypoints!r}:
    load_flow_from_entrypoint(entrypoint)
result = {{"blocked": blocked, "analysis_after_loading_flows": analysis_modules()}}
from cli.main import main
result["extract"] = run("extract", {audio!r}, "--store", {store!r}, "--model", {model!r}, "--device", "cpu")
result["analysis_after_extract"] = analysis_modules()
result["analyze"] = run("analyze", "--store", {store!r})
result["similar"] = run("similar", "--store", {store!r}, "a.wav", "-k", "1", "--json")
result["export"] = run("export", "--store", {store!r}, "--out", {store!r} + "-export")
from mess_ai.analysis import run_analysis
from mess_ai.errors import MessError
try:
    run_analysis({store!r}, baseline=False)
except MessError as exc:
    result["run_analysis"] = str(exc)
print(json.dumps(result))
"""


def test_an_extraction_worker_needs_neither_the_analysis_nor_the_export_packages(tmp_path, tiny_model, prefect_api):
    audio, store = tmp_path / "audio", tmp_path / "store"
    for i, name in enumerate(("a.wav", "b.wav", "c.wav")):
        write_audio(audio / name, seconds=2.0, frequency=220 * (i + 1))
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    entrypoints = sorted({d["entrypoint"] for d in spec["deployments"]}
                         - {"flows/analyze.py:analyze_store", "flows/export.py:export_store"})
    assert "flows/extract.py:extract_features" in entrypoints and len(entrypoints) == 2
    script = _WORKER.format(blocked=LEFT_OUT_OF_WORKERS, entrypoints=entrypoints, audio=str(audio),
                            store=str(store), model=tiny_model)
    runs = count_flow_runs()
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PREFECT_API_URL=prefect_api))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["blocked"]
    assert result["analysis_after_loading_flows"] == [] and result["analysis_after_extract"] == []
    assert result["extract"]["code"] == 0, result["extract"]
    assert re.search(r"done \(extracted now\): +3\n", result["extract"]["out"])

    # The analysis says what to install, in one line; similarity search needs none of it (exact numpy search).
    analyze = result["analyze"]
    assert analyze["code"] == 2 and "Traceback" not in analyze["err"]
    assert analyze["err"] == ("mess-ai: error: the analysis needs scikit-learn, matplotlib, librosa, which are not "
                              "installed: pip install 'mess-ai[analysis]'\n")
    assert "pip install 'mess-ai[analysis]'" in result["run_analysis"]
    assert count_flow_runs() == runs + 1  # the extraction's: no analysis run was started only to fail
    assert result["similar"]["code"] == 0, result["similar"]
    assert result["export"] == {"code": 2, "out": "", "err": "mess-ai: error: the export needs pyarrow, which is "
                                "not installed: pip install 'mess-ai[export]'\n"}
    assert [r["relative_path"] for r in json.loads(result["similar"]["out"])] in (["b.wav"], ["c.wav"])
