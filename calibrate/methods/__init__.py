"""PTQ methods: each is ``fn(model, statistics, config) -> Recipe``, registered by name.

A new method is a new module that decorates its function with ``@register("name")`` and is
imported below (or by the user before calling ``calibrate``); nothing else changes.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ...runtime.recipe import Recipe
from ..config import CalibConfig
from ..stats import Statistics

Method = Callable[[nn.Module, Statistics, CalibConfig], Recipe]
METHODS: dict[str, Method] = {}


def register(name: str) -> Callable[[Method], Method]:
    def deco(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


from . import basic, ditas, ptq4dit, smoothquant  # noqa: E402,F401  (registration)
