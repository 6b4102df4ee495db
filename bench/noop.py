"""noop: 1,000 unchanged files; deciding that nothing is new takes <= 1.5 s and never loads the model.

The store is filled once (plain Python, overhead probe), then the flow and the plain-Python pipeline are each run
again over the unchanged folder with a model loader that fails if it is ever called.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import add_figure, add_target, audio_set, flow_model_loader, new_result, run_flow, warm_up_flow
from bench.probe import OVERHEAD_PROBE, PROBE_REVISION, overhead_probe, refuse_model

NAME = "noop"
TARGET_SECONDS = 1.5
REPEATS = 3


def run(workdir: Path, quick: bool) -> dict[str, Any]:
    from mess_ai.config import ExtractConfig
    from mess_ai.pipeline import run_extraction

    result = new_result(NAME, quick)
    files = 10 if quick else 1000
    # Short 24 kHz mono files: their content is never read again, only listed and looked up.
    audio = audio_set(workdir, files, 2.0, sample_rate=24000, channels=1)
    store = workdir / "stores" / NAME
    config = ExtractConfig(model=OVERHEAD_PROBE, revision=PROBE_REVISION, device="cpu")
    first = run_extraction(audio, store, dataset=NAME, config=config, model_loader=overhead_probe)
    if first.done != files:
        raise RuntimeError(f"filling the store extracted {first.done} of {files} files")
    warm_up_flow(workdir)

    flow_walls, decisions, plain_walls = [], [], []
    for _ in range(1 if quick else REPEATS):
        started = time.perf_counter()
        with flow_model_loader(refuse_model):
            summary = run_flow(audio, store, OVERHEAD_PROBE, dataset=NAME)
        flow_walls.append(time.perf_counter() - started)
        if summary["unchanged"] != files or summary["model_loaded"]:
            raise RuntimeError(f"the no-op flow run found {summary['unchanged']} of {files} files unchanged "
                               f"(model loaded: {summary['model_loaded']})")
        decisions.append(summary["stage_seconds"]["discover"])
        started = time.perf_counter()
        plain = run_extraction(audio, store, dataset=NAME, config=config, model_loader=refuse_model)
        plain_walls.append(time.perf_counter() - started)
        if plain.unchanged != files or plain.model_loaded:
            raise RuntimeError(f"the no-op plain run found {plain.unchanged} of {files} files unchanged")

    decision, flow_wall, plain_wall = (statistics.median(x) for x in (decisions, flow_walls, plain_walls))
    add_figure(result, "deciding nothing is new (discover + plan, inside the flow)", decision, "s")
    add_figure(result, "whole no-op flow run", flow_wall, "s")
    add_figure(result, "whole no-op plain-Python run (run_extraction)", plain_wall, "s")
    add_figure(result, "deciding, per 1,000 files", decision * 1000 / files, "s")
    add_figure(result, "model loaded", 0, "times")
    add_target(result, f"deciding nothing is new <= {TARGET_SECONDS} s for 1,000 files",
               f"{decision * 1000 / files:.3f} s", decision * 1000 / files <= TARGET_SECONDS,
               "listing, one manifest query and a header check of each file's two outputs")
    add_target(result, "a no-op run never loads the model", "never loaded", True)
    result["notes"] += [
        f"{files} files of 2 s (24 kHz mono WAV), all done in the store; medians of {len(flow_walls)} runs of each.",
        "The decision is the flow's discover stage: listing the folder, one manifest query, the content key "
        "(the stored sha256 is reused while size and mtime are unchanged) and a header check of each file's outputs.",
        "The model loader raises if called; every run reported model_loaded = false.",
        "The whole no-op flow run adds Prefect's own cost of a flow run (creating it, its task runs, the run's "
        "artifacts, and up to 1 s waiting for Prefect's heartbeat thread, which sleeps in 1 s steps, to stop).",
        "Not timed: Prefect's API start and one warm-up flow run.",
    ]
    result["details"] = {"files": files, "flow_walls": flow_walls, "decisions": decisions,
                         "plain_walls": plain_walls}
    return result
