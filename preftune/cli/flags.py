"""Command-line flags generated from a pydantic model's fields, so a flag's name, type, choices,
help and default are the model's, written once (preftune/job.py, preftune/spec.py).

Every generated flag defaults to "not given" (None): only what the user typed reaches the model,
and the model's own defaults and validators apply. A validation error becomes one line naming
the flag, e.g. `--beta: Input should be greater than 0`.
"""

from __future__ import annotations

import argparse
import types
import typing
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ValidationError

from preftune.errors import UserError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation) -> type | None:
    """The one scalar type behind `T` or `T | None`; None for lists, models and other shapes."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if isinstance(annotation, type) and issubclass(annotation, (bool, int, float, str, Path, Enum)):
        return annotation
    return None


def scalar_fields(model: type[BaseModel], skip: set[str] = frozenset()) -> dict[str, type]:
    """{field name: scalar type} for the fields a flag can carry."""
    out = {}
    for name, field in model.model_fields.items():
        kind = _scalar_type(field.annotation)
        if name not in skip and kind is not None:
            out[name] = kind
    return out


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: set[str] = frozenset()) -> None:
    """One flag per scalar field of `model` (not in `skip`)."""
    for name, kind in scalar_fields(model, skip).items():
        field = model.model_fields[name]
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        shown = default.value if isinstance(default, Enum) else default
        help_text = (field.description or "") + ("" if field.is_required() or default is None
                                                 else f" (default: {shown})")
        help_text = help_text.replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif issubclass(kind, Enum):
            parser.add_argument(flag(name), dest=name, default=None, choices=[e.value for e in kind],
                                help=help_text)
        else:
            parser.add_argument(flag(name), dest=name, default=None, help=help_text,
                                type=str if kind is Path else kind,
                                metavar="PATH" if kind is Path else None)


def given(args: argparse.Namespace, model: type[BaseModel], skip: set[str] = frozenset()) -> dict:
    """The generated flags the user actually gave, as field values."""
    return {name: getattr(args, name) for name in scalar_fields(model, skip)
            if getattr(args, name, None) is not None}


def build(model: type[BaseModel], data: dict, *, where: str = "", names: dict[str, str] | None = None):
    """`model(**data)`, with a validation error turned into one line naming the flag."""
    try:
        return model(**data)
    except ValidationError as err:
        raise UserError(validation_message(err, where, names)) from None


def validation_message(err: ValidationError, where: str = "", names: dict[str, str] | None = None) -> str:
    """The first error as `--flag: problem (got VALUE)`; `names` maps fields whose flag is not
    `--field-name` (a list field `betas` given as repeated `--beta`)."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    message = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    if isinstance(value, (int, float, str)) and not isinstance(value, bool) and first["type"] != "missing":
        message += f" (got {value!r})"
    if not loc:
        return f"{where}{message}"
    head = (names or {}).get(loc[0]) or flag(loc[0])
    return f"{where}{head}: {message}" if len(loc) == 1 or loc[1].isdigit() else f"{where}{head}.{'.'.join(loc[1:])}: {message}"


def add_endpoint_flags(parser: argparse.ArgumentParser, role: str, *, help: str, required: bool = False,
                       prices: bool = True) -> None:
    """The flags of one endpoint, the same in every command: `--ROLE MODEL[@BASE_URL]`, where its
    key lives (`--ROLE-api-key-env NAME`, `--ROLE-api-key-block NAME`) and its prices."""
    parser.add_argument(f"--{role}", required=required, metavar="MODEL[@BASE_URL]", default=None, help=help)
    parser.add_argument(f"--{role}-api-key-env", f"--{role}-key-env", dest=f"{role}_api_key_env", metavar="NAME",
                        help=f"NAME of the environment variable holding the {role} API's key (never the key)")
    parser.add_argument(f"--{role}-api-key-block", f"--{role}-key-block", dest=f"{role}_api_key_block",
                        metavar="NAME", help=f"NAME of the Prefect Secret block holding the {role} API's key")
    if prices:
        parser.add_argument(f"--{role}-price-in", type=float, default=None, metavar="USD",
                            help="USD per 1M input tokens (no price: the cost is shown as unknown)")
        parser.add_argument(f"--{role}-price-out", type=float, default=None, metavar="USD",
                            help="USD per 1M output tokens")


def endpoint_from_args(args: argparse.Namespace, role: str):
    """The Endpoint the `add_endpoint_flags` flags describe (None when `--ROLE` was not given),
    through the one endpoint parser; a bad value is one line naming the flag."""
    from preftune.endpoint import Endpoint

    text = getattr(args, role)
    if not text:
        return None
    try:
        return Endpoint.parse(text, api_key_env=getattr(args, f"{role}_api_key_env"),
                              api_key_block=getattr(args, f"{role}_api_key_block"),
                              price_input_per_m=getattr(args, f"{role}_price_in", None),
                              price_output_per_m=getattr(args, f"{role}_price_out", None))
    except ValidationError as err:
        names = {"price_input_per_m": f"--{role}-price-in", "price_output_per_m": f"--{role}-price-out",
                 "model": f"--{role}", "base_url": f"--{role}"}
        raise UserError(validation_message(err, names=names)) from None
