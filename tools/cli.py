"""Build an argparse parser from a config dataclass, so a CLI and the Python API share one
source of truth: each field becomes ``--field-name`` with its type, default and
``metadata["help"]``; ``Literal`` types become choices, ``bool`` fields ``--x/--no-x`` switches,
``list[int]`` a comma-separated list, ``X | None`` an optional value; ``metadata["metavar"]``
names the value in the help.

Exit codes shared by every dtq command: 0 success, 1 a check failed, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

T = TypeVar("T")

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one option per field of ``cls`` (names in ``skip`` are left for the caller)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True  # a field without a default is a required option
        if typing.get_origin(tp) is Literal:
            kwargs.update(choices=list(typing.get_args(tp)), type=type(typing.get_args(tp)[0]))
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            kwargs.update(type=_int_list if item is int else _float_list if item is float else (lambda s: s.split(",")),
                          metavar=f"{item.__name__.upper()},...")
        elif tp in (int, float, str, Path):
            kwargs["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported field type {tp!r}")
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        if help_text and default is not None and tp is not bool:
            help_text += f" (default: {default})"
        elif help_text and optional and default is None:
            help_text += " (default: none)"
        parser.add_argument(flag, help=help_text, **kwargs)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in vars(args).items() if k in names}
    return cls(**{**values, **extra})


def run_cli(main: Callable[[], int]) -> int:
    """Turn dtq's user-facing errors into exit code 2 with a one-line message, not a traceback:
    bad input (ValueError and its subclasses: config, checkpoint, recipe, ONNX file, output path)
    and a missing optional dependency (the message names the extra to install)."""
    import sys

    from ..extras import MissingExtra, missing_extra_message

    try:
        return main()
    except MissingExtra as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:  # an optional dependency imported where it is used
        msg = missing_extra_message(exc.name or "")
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
