"""Command-line flags generated from frozen config dataclasses.

Each field becomes `--field-name` with its default and type; nested config
dataclasses contribute their fields too (flat, so names must be unique).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def _base_type(tp: Any) -> Any:
    """int | None -> int; bool stays bool."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            add_dataclass_args(parser, tp, skip)
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=tp, default=default, help=f"(default: {default})")


def dataclass_from_args(cls: type, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> Any:
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(tp):
            kw[f.name] = dataclass_from_args(tp, args, skip)
        elif hasattr(args, f.name):
            kw[f.name] = getattr(args, f.name)
    return cls(**kw)
