"""Command-line options generated from the settings models (``mess_ai.config``): one option per field, named
after it (``min_duration_seconds`` -> ``--min-duration-seconds``), with the field's description and default as
its help. An option not given leaves the field at its default, so the defaults live in one place."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def _value_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``; other annotations as they are."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner[0] if len(inner) == 1 else str
    return annotation


def add_model_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model: type[BaseModel],
                      prefix: str, skip: tuple[str, ...] = (), help_overrides: dict[str, str] | None = None) -> None:
    """Add an option per field of ``model`` (except ``skip``), stored as ``<prefix><field>`` (None: not given)."""
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
        # An override says its own default (a CLI rule on top of the field's).
        said = text.rstrip(".") if name in (help_overrides or {}) else f"{text.rstrip('.')} (default: {shown})"
        options: dict[str, Any] = {"dest": dest, "default": None, "help": said}
        if typing.get_origin(kind) is Literal:
            options["choices"] = list(typing.get_args(kind))
        else:
            options["type"] = kind if kind in (int, float) else str
            options["metavar"] = name.upper()
        parser.add_argument(flag, **options)


def model_from_options(model: type[M], args: argparse.Namespace, prefix: str, **overrides: Any) -> M:
    """The ``model`` the options given say (the others at their defaults), with ``overrides`` on top."""
    values = {name: getattr(args, prefix + name) for name in model.model_fields
              if getattr(args, prefix + name, None) is not None}
    return model(**{**values, **overrides})
