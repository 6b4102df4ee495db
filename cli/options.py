"""The conventions every ``mess-ai`` command shares, and the options made from settings.

- Options generated from the settings models (``mess_ai.config``): one per field, named after it
  (``min_duration_seconds`` -> ``--min-duration-seconds``), with the field's description and default as its help.
  An option not given leaves the field at its default, so the defaults live in one place.
- Options whose default is a ``MESS_AI_*`` environment variable, the variables the Makefile and prefect.yaml use
  (``add_env_option``): the command line wins, then the variable, then the option's own default; ``--help`` says
  which variable and, when it is set, its value (a manifest URL without its password).
- Subcommands (``add_command``): ``-v``/``-q`` also after the subcommand, and an example at the end of ``--help``.
"""

from __future__ import annotations

import argparse
import os
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

STORE_ENV = "MESS_AI_STORE"
INCOMING_ENV = "MESS_AI_INCOMING"
MODEL_ENV = "MESS_AI_MODEL"
# The same name as mess_ai.store.manifest.MANIFEST_URL_ENV (the flows read it too), not imported from there: that
# module loads SQLAlchemy, which `mess-ai --help` should not wait for.
MANIFEST_URL_ENV = "MESS_AI_MANIFEST_URL"


def env_value(variable: str) -> str | None:
    """``$variable``, None when unset or empty (the Makefile exports an empty value for 'none')."""
    return os.environ.get(variable) or None


@dataclass(frozen=True)
class EnvDefault:
    """Where an option's default comes from: ``$variable`` when set, else ``otherwise`` (what --help calls the
    default); ``otherwise`` None: the option is required unless the variable is set. ``secret``: the value may hold
    a password, so --help shows it masked."""

    variable: str
    otherwise: str | None
    secret: bool = False

    def note(self) -> str:
        """What --help adds after the option's text, e.g. 'default: $MESS_AI_STORE = /data/store'."""
        value = env_value(self.variable)
        if value is not None:
            if self.secret:
                from mess_ai.store.manifest import shown_url

                value = shown_url(value)
            return f"default: ${self.variable} = {value}"
        if self.otherwise is None:
            return f"required unless {self.variable} is set"
        return f"default: {self.otherwise}; or set {self.variable}"


def add_env_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *names: str, env: EnvDefault,
                   **kwargs: Any) -> argparse.Action:
    """``parser.add_argument(*names, **kwargs)`` with ``$env.variable`` as its default (converted by ``type`` as a
    typed value would be). A positional needs ``nargs="?"``. When ``env.otherwise`` is None and neither the option
    nor the variable is there, ``Parser`` ends with a usage error naming both."""
    action = parser.add_argument(*names, default=env_value(env.variable), **kwargs)
    action.env = env  # read by Parser (the required check) and HelpFormatter (the note)
    return action


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that refuses a required ``add_env_option`` option given neither on the command line nor
    in the environment. Its subcommands' parsers are of this class too (argparse makes them of the parent's)."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            env = getattr(action, "env", None)
            if env is not None and env.otherwise is None and getattr(namespace, action.dest, None) is None:
                name = "/".join(action.option_strings) or action.metavar or action.dest
                self.error(f"{name} is required: give it, or set {env.variable}")
        return namespace, extras


class HelpFormatter(argparse.HelpFormatter):
    """Wraps a description's lines but keeps indented ones (examples) as written, and adds to an
    ``add_env_option`` option's help where its default comes from."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if not line or line.startswith(" ")
                         else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action) or ""
        env = getattr(action, "env", None)
        if env is None:
            return text
        # A value may hold '%' (a URL-encoded password character): argparse %-formats help strings.
        return f"{text} ({env.note().replace('%', '%%')})"


def add_global_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """``-v`` and ``-q``. The top-level parser gives them ``default=False``; each subcommand gives them
    ``argparse.SUPPRESS``, so that they work after the subcommand without resetting one given before it."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


def add_command(subparsers: argparse._SubParsersAction, name: str, *, help: str, example: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand: ``help`` is its line in ``mess-ai --help``, ``description`` (default ``help``) heads its own
    --help and ``example`` (one command line, or several) ends it. It takes the global flags too."""
    parser = subparsers.add_parser(name, help=help, description=description or help,
                                   epilog="example:\n" + "\n".join(f"  {line}" for line in example.splitlines()),
                                   formatter_class=HelpFormatter)
    add_global_flags(parser, argparse.SUPPRESS)
    return parser


def add_store_options(parser: argparse.ArgumentParser, dataset_default: str,
                      json_help: str = "print JSON instead of text") -> None:
    """``--store`` (``$MESS_AI_STORE``), ``--dataset``, ``--manifest-url`` (``$MESS_AI_MANIFEST_URL``) and
    ``--json``, for the commands that read or write a store. ``dataset_default``: what the command does without
    ``--dataset``."""
    add_env_option(parser, "--store", env=EnvDefault(STORE_ENV, otherwise=None), type=Path,
                   help="feature store folder")
    parser.add_argument("--dataset", default=None, help=f"dataset inside the store (default: {dataset_default})")
    add_env_option(parser, "--manifest-url", metavar="URL", help="SQLAlchemy URL of the manifest",
                   env=EnvDefault(MANIFEST_URL_ENV, otherwise="the SQLite file manifest.sqlite in the store",
                                  secret=True))
    parser.add_argument("--json", action="store_true", help=json_help)


def _value_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``; other annotations as they are."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner[0] if len(inner) == 1 else str
    return annotation


def add_model_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model: type[BaseModel],
                      prefix: str, skip: tuple[str, ...] = (), help_overrides: dict[str, str] | None = None,
                      env: Mapping[str, str] | None = None) -> None:
    """Add an option per field of ``model`` (except ``skip``), stored as ``<prefix><field>`` (None: not given).
    ``env``: field -> environment variable whose value, when set, is the option's default; it reaches the model
    as a value typed on the command line would, so the model validates it the same way."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        text = (help_overrides or {}).get(name) or field.description or ""
        default = field.default
        kind = _value_type(field.annotation)
        dest = prefix + name
        if kind is bool:
            parser.add_argument(flag, dest=dest, action="store_const", const=True, default=None,
                                help=text.rstrip("."))
            continue
        shown = "none" if default is None else default
        options: dict[str, Any] = {"dest": dest}
        if typing.get_origin(kind) is Literal:
            options["choices"] = list(typing.get_args(kind))
        else:
            options["type"] = kind if kind in (int, float) else str
            options["metavar"] = name.upper()
        if name in (env or {}):
            add_env_option(parser, flag, env=EnvDefault(env[name], otherwise=str(shown)), help=text.rstrip("."),
                           **options)
            continue
        # An override says its own default (a CLI rule on top of the field's).
        said = text.rstrip(".") if name in (help_overrides or {}) else f"{text.rstrip('.')} (default: {shown})"
        parser.add_argument(flag, default=None, help=said, **options)


def model_from_options(model: type[M], args: argparse.Namespace, prefix: str, **overrides: Any) -> M:
    """The ``model`` the options given say (the others at their defaults), with ``overrides`` on top."""
    values = {name: getattr(args, prefix + name) for name in model.model_fields
              if getattr(args, prefix + name, None) is not None}
    return model(**{**values, **overrides})
