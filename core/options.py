"""Command-line options derived from a stage's frozen config dataclass.

A config field declares its option once, with :func:`option` (its help text, and where the
default spelling is not enough, its flag, metavar or parser); :func:`add_options` turns every
field into an argparse option, :func:`config_kwargs` turns parsed arguments back into the
config's keyword arguments, and :func:`to_argv` writes a config back as the flags that
reproduce it (reports print that line).  Nothing is copied by hand, so a new field is a new
option everywhere.

How a field's type becomes an option (``from __future__ import annotations`` types resolved):

* ``bool``: ``--name`` sets True where the default is False; ``--no-name`` sets False where it is
  True; ``flags=(on, off)`` names both sides explicitly.
* an ``Enum``: ``choices`` of its values.
* ``tuple[X, ...]``: a comma list of X.
* ``X | None``: X, or ``none`` (default ``"all"`` where given) for None.
* ``int``, ``float``, ``str``; ``parse=`` for anything else (budgets like ``8/255``).
* a nested config dataclass: its fields, flattened (the quantize gates).

Standard library only.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from enum import Enum
from typing import Any, Callable, Iterable

from dafar.errors import ConfigError

__all__ = ["option", "add_options", "config_kwargs", "to_argv", "cli_fields"]

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, flag: str | None = None, flags: tuple[str, str] | None = None,
           metavar: str | None = None, parse: Callable[[str], Any] | None = None,
           fmt: Callable[[Any], str] | None = None, none: str | None = None, cli: bool = True,
           default_factory: Any = _MISSING) -> Any:
    """A dataclass field that is also a command-line option (see the module docstring); ``parse``
    reads its text and ``fmt`` writes it back (both derived from the type when not given)."""
    meta = {"help": help, "flag": flag, "flags": flags, "metavar": metavar, "parse": parse, "fmt": fmt, "none": none,
            "cli": cli}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"dafar_option": meta})
    return dataclasses.field(default=default, metadata={"dafar_option": meta})


@dataclasses.dataclass(frozen=True)
class _Opt:
    name: str  # field name (argparse dest)
    path: tuple[str, ...]  # nested config fields lead here
    type: Any
    meta: dict
    default: Any


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def cli_fields(cls, prefix: tuple[str, ...] = ()) -> list[_Opt]:
    """The config's options, nested configs flattened, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("dafar_option")
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += cli_fields(tp, prefix + (f.name,))
            continue
        if meta is None or not meta["cli"]:
            continue
        out.append(_Opt(f.name, prefix + (f.name,), tp, meta, _field_default(f)))
    return out


def _flag(o: _Opt) -> str:
    return o.meta["flag"] or "--" + o.name.replace("_", "-")


def _scalar_parser(tp) -> Callable[[str], Any]:
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp
    if tp in (int, float, str):
        return tp
    return str


def _parser(o: _Opt) -> Callable[[str], Any]:
    """str -> value for one option, with errors naming the flag."""
    if o.meta["parse"]:
        base = o.meta["parse"]
    else:
        tp, optional = _unwrap_optional(o.type)
        if typing.get_origin(tp) is tuple:
            elem = _scalar_parser(typing.get_args(tp)[0])

            def base(text, elem=elem):
                items = [v.strip() for v in text.split(",") if v.strip()]
                if not items:
                    raise ValueError("an empty list")
                return tuple(elem(v) for v in items)
        else:
            base = _scalar_parser(tp)
    none_word = o.meta["none"]

    def parse(text: str):
        if none_word is not None and text == none_word:
            return None
        try:
            return base(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        except (ValueError, TypeError, ZeroDivisionError) as exc:
            tp = _unwrap_optional(o.type)[0]
            if typing.get_origin(tp) is tuple:
                tp = typing.get_args(tp)[0]
            hint = f" or '{none_word}'" if none_word else ""
            if isinstance(tp, type) and issubclass(tp, Enum) and not o.meta["parse"]:
                raise argparse.ArgumentTypeError(
                    f"{text!r}: choose from {', '.join(e.value for e in tp)}{hint}") from None
            kind = "comma-separated values" if typing.get_origin(_unwrap_optional(o.type)[0]) is tuple else "a value"
            raise argparse.ArgumentTypeError(f"takes {kind}{hint}, got {text!r} ({exc})") from None

    return parse


def _fmt(value: Any, o: _Opt) -> str:
    if value is None:
        return o.meta["none"] or "none"
    if o.meta["fmt"]:
        return o.meta["fmt"](value)
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ",".join(_fmt(v, o) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def add_options(parser: argparse.ArgumentParser, cls, *, skip: Iterable[str] = (),
                defaults: dict[str, str] | None = None, group: str | None = None) -> None:
    """Add an option per field of config class ``cls``.  Options the user does not give are
    absent from the parsed namespace (the config's own default applies).  Help shows each
    field's default, or the text ``defaults`` gives for it (e.g. "set by --profile")."""
    skip = set(skip)
    target = parser.add_argument_group(group) if group else parser
    for o in cli_fields(cls):
        if o.name in skip:
            continue
        help_text = o.meta["help"].replace("%", "%%")
        tp, _ = _unwrap_optional(o.type)
        if tp is bool:
            on, off = o.meta["flags"] or ((None, o.meta["flag"] or f"--no-{o.name.replace('_', '-')}") if o.default is True
                                          else (o.meta["flag"] or f"--{o.name.replace('_', '-')}", None))
            if on:
                target.add_argument(on, dest=o.name, action="store_const", const=True, default=argparse.SUPPRESS,
                                    help=help_text if not off else help_text)
            if off:
                target.add_argument(off, dest=o.name, action="store_const", const=False, default=argparse.SUPPRESS,
                                    help=(f"the opposite of {on}" if on else help_text))
            continue
        shown = (defaults or {}).get(o.name) or (None if o.default is _MISSING else _fmt(o.default, o))
        if shown is not None and "(default" not in help_text:
            help_text += f" (default: {shown})"
        kw: dict = {"dest": o.name, "default": argparse.SUPPRESS, "type": _parser(o), "help": help_text}
        if isinstance(tp, type) and issubclass(tp, Enum) and not o.meta["parse"]:
            kw["metavar"] = o.meta["metavar"] or "{" + ",".join(e.value for e in tp) + "}"
        elif o.meta["metavar"]:
            kw["metavar"] = o.meta["metavar"]
        target.add_argument(_flag(o), **kw)


def config_kwargs(cls, args: argparse.Namespace, skip: Iterable[str] = ()) -> dict:
    """The keyword arguments of ``cls`` that the parsed ``args`` gave (nested configs built from
    their own given fields over their defaults)."""
    given = vars(args)
    skip = set(skip)
    top: dict = {}
    nested: dict[str, dict] = {}
    for o in cli_fields(cls):
        if o.name in skip or o.name not in given:
            continue
        if len(o.path) == 1:
            top[o.name] = given[o.name]
        else:
            nested.setdefault(o.path[0], {})[o.name] = given[o.name]
    hints = typing.get_type_hints(cls)
    for name, kw in nested.items():
        top[name] = hints[name](**kw)
    return top


def to_argv(cfg, base=None, *, always: Iterable[str] = (), skip: Iterable[str] = ()) -> list[str]:
    """The flags that turn ``base`` (default: the config class's defaults) into ``cfg``: fields
    that differ, plus those named in ``always``."""
    always, skip = set(always), set(skip)
    base = base if base is not None else type(cfg)()
    argv: list[str] = []
    for o in cli_fields(type(cfg)):
        if o.name in skip:
            continue
        value, ref = cfg, base
        for p in o.path:
            value, ref = getattr(value, p), getattr(ref, p)
        if value == ref and o.name not in always:
            continue
        tp, _ = _unwrap_optional(o.type)
        if tp is bool:
            on, off = o.meta["flags"] or ((None, o.meta["flag"] or f"--no-{o.name.replace('_', '-')}") if o.default is True
                                          else (o.meta["flag"] or f"--{o.name.replace('_', '-')}", None))
            flag = on if value else off
            if flag:
                argv.append(flag)
            continue
        argv += [_flag(o), _fmt(value, o)]
    return argv
