"""Dagster run config derived from the stage config dataclasses, so each field is defined once.

`stage_config(FilterConfig, "FilteredDocumentsConfig")` is a `dg.Config` class with FilterConfig's fields: the
same names, defaults and docstrings (shown in the Launchpad), with tuples as lists and dicts as typed mappings.
`to_stage(config, FilterConfig)` turns the run config back into the dataclass. A stage field the UI should not
show (a nested dataclass, a file the project provides) is left out with `exclude`; asset-only fields are given as
`extra` pydantic fields.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from typing import Any

import dagster as dg
import pydantic


def attribute_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (a string literal on the line after it), by field name."""
    docs: dict[str, str] = {}
    [node] = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    for stmt, after in itertools.pairwise(node.body):
        named = isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
        literal = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if named and literal and isinstance(after.value.value, str):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def config_type(tp: Any) -> Any:
    """A dataclass field's type as Dagster config takes it: tuples become lists, dicts typed mappings."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(config_type(a) for a in args)]  # noqa: UP007 (built from a tuple of types)
    if origin is tuple or tp is tuple:
        item = args[0] if args and ((len(args) == 2 and args[1] is Ellipsis) or len(set(args)) == 1) else Any
        return list[config_type(item)]
    if tp is dict or origin is dict:
        return dict[str, Any]
    return tp


def config_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def stage_config(
    cls: type,
    name: str,
    doc: str | None = None,
    exclude: tuple[str, ...] = (),
    include: tuple[str, ...] | None = None,
    base: type[dg.Config] = dg.Config,
    **extra: tuple[Any, Any],
) -> type[dg.Config]:
    """A dg.Config class (subclass of `base`) named `name` with the fields of dataclass `cls` (only `include` when
    given, never `exclude` or nested dataclasses), plus `extra` (name=(type, pydantic.Field(...)))."""
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    fields: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(cls):
        if (
            f.name in exclude
            or (include is not None and f.name not in include)
            or dataclasses.is_dataclass(hints[f.name])
        ):
            continue
        if f.default is not dataclasses.MISSING:
            default = pydantic.Field(default=config_value(f.default), description=docs.get(f.name))
        else:
            default = pydantic.Field(default_factory=lambda f=f: config_value(f.default_factory()),
                                     description=docs.get(f.name))  # fmt: skip
        fields[f.name] = (config_type(hints[f.name]), default)
    model = pydantic.create_model(name, __base__=base, __module__=cls.__module__, **fields, **extra)
    model.__doc__ = doc or cls.__doc__
    return model


def to_stage(config: dg.Config, cls: type, **values: Any):
    """The dataclass `cls` from run config made by `stage_config` (lists back to tuples), with `values` on top."""
    hints = typing.get_type_hints(cls)
    dumped = config.model_dump()
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values or f.name not in dumped:
            continue
        value = dumped[f.name]
        is_tuple = typing.get_origin(hints[f.name]) is tuple or any(
            typing.get_origin(a) is tuple for a in typing.get_args(hints[f.name])
        )
        kwargs[f.name] = tuple(value) if is_tuple and isinstance(value, list) else value
    return cls(**kwargs, **values)
