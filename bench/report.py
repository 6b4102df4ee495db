"""Benchmark results as text: one result for the console, every result as ``docs/benchmarks.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The order the docs list benchmarks in: the order.
ORDER = ("model-bound", "end-to-end", "overhead", "dataset-size", "noop", "memory", "storage", "seed-baseline", "gpu")


def _value(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if unit == "cosine":
        return f"{value:.5f}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if magnitude >= 0.001 or value == 0 else f"{value:.2e}"


def _met(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[met]


def format_result(result: dict[str, Any]) -> str:
    lines = []
    if "error" in result:
        lines.append(f"{result['benchmark']}: FAILED\n{result['error']}")
    for figure in result["figures"]:
        lines.append(f"  {figure['label']}: {_value(figure['value'], figure['unit'])} {figure['unit']}")
    for target in result["targets"]:
        why = f" ({target['why']})" if target["why"] else ""
        lines.append(f"  target {target['target']}: {target['measured']} -> {_met(target['met'])}{why}")
    lines.append(f"  [{result.get('benchmark_seconds', 0):.0f} s]")
    return "\n".join(lines)


def _machine_line(machine: dict[str, Any]) -> str:
    cuda = f"CUDA: {machine['cuda']}" if machine.get("cuda") else "no CUDA"
    return (f"{machine['cpu']}, {machine['logical_cores']} logical cores ({machine['physical_cores']} physical), "
            f"{machine['ram_gib']} GiB RAM, {cuda}; {machine['os']}, Python {machine['python']}, "
            f"torch {machine['torch']} ({machine['torch_threads']} threads)")


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    results = [json.loads(path.read_text()) for path in sorted(results_dir.glob("*.json"))]
    results = [r for r in results if not r.get("quick")]
    rank = {name: index for index, name in enumerate(ORDER)}
    return sorted(results, key=lambda r: rank.get(r["benchmark"], len(ORDER)))


def render(results: list[dict[str, Any]]) -> str:
    out = ["# Benchmarks", "",
           "Written by `make bench` (`python -m bench`; one benchmark: `python -m bench NAME`) from "
           "`bench/results/*.json`. Do not edit by hand: the next run rewrites this file.", "",
           "Each benchmark measures its figures side by side in one run. The machine may be shared: a load average "
           "near or above its core count during a benchmark means other work was running, which inflates its "
           "times and can favour either side of a comparison.",
           ""]
    machines = {_machine_line(r["machine"]) for r in results}
    dates = sorted(r["date"] for r in results)
    if dates:
        out += [f"- Machine: {' / '.join(sorted(machines))}",
                f"- Date (UTC): {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else ""), ""]
    out += ["## Targets", "", "| benchmark | target | measured | status | why |", "|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            out.append(f"| {r['benchmark']} | | | FAILED | the benchmark raised; see its JSON |")
        for t in r["targets"]:
            out.append(f"| {r['benchmark']} | {t['target']} | {t['measured']} | {_met(t['met'])} | {t['why']} |")
    out.append("")
    for r in results:
        start, end = (", ".join(str(x) for x in r.get(key, [])) or "n/a"
                      for key in ("load_average_at_start", "load_average_at_end"))
        out += [f"## {r['benchmark']}", "",
                f"Measured {r['date']} in {r.get('benchmark_seconds', 0):.0f} s; load average (1, 5, 15 min) at its "
                f"start: {start}; at its end: {end}.", ""]
        if r["figures"]:
            out += ["| figure | value | unit |", "|---|---|---|"]
            out += [f"| {f['label']} | {_value(f['value'], f['unit'])} | {f['unit']} |" for f in r["figures"]]
            out.append("")
        out += [f"- {note}" for note in r["notes"]]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_docs(results_dir: Path, docs_path: Path) -> None:
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    docs_path.write_text(render(load_results(results_dir)))


if __name__ == "__main__":  # `python -m bench.report`: docs/benchmarks.md from bench/results, running nothing
    from bench.common import DOCS_PATH, RESULTS_DIR

    write_docs(RESULTS_DIR, DOCS_PATH)
    print(f"Updated {DOCS_PATH} from {RESULTS_DIR}")
