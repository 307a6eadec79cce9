"""Command-line flags generated from frozen config dataclasses.

Each field becomes `--field-name` with its default and type; nested config
dataclasses contribute their fields too (flat, so names must be unique).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _base_type(tp: Any) -> Any:
    """int | None -> int; bool stays bool."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return tp
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
        if typing.get_origin(tp) is tuple:          # tuple[str, ...]: repeat the flag
            parser.add_argument(flag, type=typing.get_args(tp)[0], action="append", default=None,
                                help="(repeatable)")
        elif tp is bool:
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
            v = getattr(args, f.name)
            kw[f.name] = tuple(v or ()) if typing.get_origin(tp) is tuple else v
    return cls(**kw)


def dataclass_to_argv(obj: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that rebuild `obj` with add_dataclass_args (fields left at their default are omitted)."""
    argv: list[str] = []
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            argv += dataclass_to_argv(v, skip)
            continue
        if f.default is not dataclasses.MISSING and v == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + f.name.replace("_", "-"))
        elif isinstance(v, tuple):
            for item in v:
                argv += [flag, str(item)]
        elif v is not None:
            argv += [flag, str(v)]
    return argv
