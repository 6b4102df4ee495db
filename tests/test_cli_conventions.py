"""What every ``mess-ai`` command shares: --version, defaults from the MESS_AI_* environment variables, -v and -q
after the subcommand, and a --help with defaults and an example."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import mess_ai
from cli.main import build_parser, main
from cli.options import HelpFormatter
from mess_ai.config import ExtractConfig
from mess_ai.pipeline import run_extraction
from tests.helpers.audio import write_audio

REPO = Path(__file__).resolve().parents[1]


def _commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"mess-ai {mess_ai.__version__}\n"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["version"] == mess_ai.__version__


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """An audio folder and a store holding its features, extracted with the tiny model (without Prefect)."""
    root = tmp_path_factory.mktemp("extracted")
    write_audio(root / "audio" / "a.wav", seconds=2.0)
    write_audio(root / "audio" / "b.wav", seconds=2.0, frequency=300)
    config = ExtractConfig(model=tiny_model, device="cpu")
    assert run_extraction(root / "audio", root / "store", config=config).done == 2
    return root / "audio", root / "store"


def test_store_and_model_come_from_the_environment(extracted, tiny_model, tmp_path, monkeypatch, capsys):
    audio, store = extracted
    monkeypatch.setenv("MESS_AI_STORE", str(store))
    monkeypatch.setenv("MESS_AI_MODEL", tiny_model)
    # Nothing new for this store and this model: without Prefect, and only when both reached the run's config.
    assert main(["extract", str(audio), "--device", "cpu"]) == 0
    assert "nothing new, so no flow run was started" in capsys.readouterr().out
    assert main(["check"]) == 0
    assert "checked 2 tracks" in capsys.readouterr().out

    # The command line wins over the environment.
    assert main(["failures", "--store", str(tmp_path / "elsewhere")]) == 2
    assert f"no manifest at {tmp_path / 'elsewhere'}" in capsys.readouterr().err

    # A model from the environment is used, and refused, as one typed on the command line.
    monkeypatch.setenv("MESS_AI_MODEL", str(tmp_path / "no-model"))
    assert main(["extract", str(audio), "--device", "cpu"]) == 2
    assert f"Model {tmp_path / 'no-model'} is not available" in capsys.readouterr().err


def test_retry_failed_prefers_the_datasets_model_to_the_environments(tiny_model, tmp_path, monkeypatch, capsys):
    audio, store = tmp_path / "audio", tmp_path / "store"
    write_audio(audio / "ok.wav", seconds=2.0)
    write_audio(audio / "short.wav", seconds=0.5)
    config = ExtractConfig(model=tiny_model, device="cpu")
    assert len(run_extraction(audio, store, config=config).failures) == 1
    (audio / "short.wav").unlink()  # its owner took it away: nothing left to retry, so no flow run is needed
    monkeypatch.setenv("MESS_AI_MODEL", str(tmp_path / "no-model"))
    assert build_parser().parse_args(["retry-failed", "--store", str(store)]).config_model is None
    # The plan is made with the dataset's model (the tiny one): $MESS_AI_MODEL would be refused as unavailable.
    assert main(["retry-failed", "--store", str(store), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert "nothing new, so no flow run was started" in capsys.readouterr().out


def test_a_store_neither_given_nor_set_is_a_usage_error_naming_both(monkeypatch, capsys):
    monkeypatch.delenv("MESS_AI_STORE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["check"])
    assert exit_info.value.code == 2
    assert "mess-ai check: error: --store is required: give it, or set MESS_AI_STORE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["watch", "--local"])
    assert "AUDIO_DIR is required: give it, or set MESS_AI_INCOMING" in capsys.readouterr().err


@pytest.mark.parametrize("argv, verbose, quiet", [
    (["failures", "--store", "s", "-v"], True, False),
    (["-v", "failures", "--store", "s"], True, False),  # not reset by the subcommand's own -v
    (["failures", "-q", "--store", "s"], False, True),
    (["-q", "extract", "folder", "--store", "s", "--verbose"], True, True),
    (["failures", "--store", "s"], False, False),
])
def test_global_flags_before_or_after_the_subcommand(argv, verbose, quiet):
    args = build_parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


def test_verbose_after_the_subcommand_turns_on_debug_logging(tmp_path):
    """In a process of its own: under pytest the root logger has handlers already, so the CLI's logging setup
    does nothing there."""
    code = ("import logging, sys; from cli.main import main; "
            f"code = main(['failures', '--store', {str(tmp_path)!r}, '-v']); "
            "print(code, logging.getLogger().level)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", str(logging.DEBUG)], proc.stderr


def test_every_command_has_help_with_defaults_its_variables_and_an_example(capsys):
    commands = _commands()
    assert {"extract", "retry-failed", "check", "failures", "similar", "analyze", "watch", "serve",
            "make-test-model", "demo"} <= set(commands)
    for name, parser in commands.items():
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "\nexample:\n  " in text and "mess-ai " + name in text.split("\nexample:\n", 1)[1], name
        formatter = HelpFormatter(f"mess-ai {name}")
        for action in parser._actions:
            if action.option_strings and action.nargs != 0 and action.dest != "help":
                said = formatter._get_help_string(action)
                assert "default" in said or "required" in said, f"{name} {action.option_strings[0]}"
            env = getattr(action, "env", None)
            if env is not None:
                assert env.variable in text, f"{name} {action.dest}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "start here:\n  mess-ai demo" in text
    assert all(f"\n    {name}" in text for name in commands)


def test_help_shows_the_value_of_a_variable_that_is_set(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MESS_AI_STORE", str(tmp_path / "100%s-from-env"))  # argparse %-formats help text
    monkeypatch.delenv("MESS_AI_MODEL", raising=False)
    monkeypatch.setenv("COLUMNS", "400")  # each option's help on one line
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = capsys.readouterr().out
    assert f"(default: $MESS_AI_STORE = {tmp_path / '100%s-from-env'})" in text
    assert "(default: m-a-p/MERT-v1-95M; or set MESS_AI_MODEL)" in text
