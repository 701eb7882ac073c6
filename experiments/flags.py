"""Command lines generated from dataclasses: one ``--flag`` per field.

Every field carries its help text in its metadata (:func:`option`); :func:`add_arguments` turns
the fields into argparse flags (``learning_rate`` -> ``--learning-rate``), so a command line, the
JSON a run saves and the Python API never drift apart. :mod:`experiments.config` builds the
training command line with it; a protocol (a sweep, a paper's experiment) adds the fields of its
own dataclass to the same flags.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are two lines, a short usage and the ``error:`` line
    (argparse's own usage lists every flag: dozens of lines before the one that matters), with
    the closest flag suggested for a misspelt one."""

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments:"):
            known = [s for action in self._actions for s in action.option_strings]
            for word in message.split(":", 1)[1].split():
                flag = word.split("=", 1)[0]
                close = difflib.get_close_matches(flag, known, n=1) if flag[:2] == "--" else []
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        self.exit(
            2,
            f"usage: {self.prog} [--FLAG VALUE ...] (--help lists every flag)\nerror: {message}\n",
        )


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field that is also a command-line flag (see :func:`add_arguments`)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata=dict(help=help, **metadata)
        )
    return dataclasses.field(default=default, metadata=dict(help=help, **metadata))


def _scalar_type(annotation: Any) -> type:
    """int/float/str/bool from an evaluated annotation such as ``int | None`` (the items' type
    for ``Sequence[int]`` or ``tuple[float, ...]``: a flag with ``nargs`` parses each item)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0]
    if typing.get_origin(annotation) in (tuple, list, collections.abc.Sequence):
        annotation = typing.get_args(annotation)[0]
    return annotation


class _DeprecatedFlag(argparse.Action):
    """An old spelling of a flag: stores into the new flag's field, with a one-line warning."""

    def __init__(self, option_strings, dest, *, new_flag: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag = new_flag

    warned: set[str] = set()  # once per spelling and process

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string not in self.warned:
            self.warned.add(option_string)
            print(
                f"warning: {option_string} is deprecated and will be removed; use {self.new_flag}.",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    exclude: Iterable[str] = (),
    *,
    defaults: Mapping[str, Any] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    suppress_defaults: bool = False,
) -> None:
    """Adds one ``--flag-name`` per dataclass field (help text and choices from its metadata).

    Field metadata may name the ``flag`` (default: ``--field-name``), its ``parse`` function,
    ``choices``, ``nargs`` and ``metavar``; ``cli=False`` keeps a field off the command line.
    `defaults` replace the fields' defaults (a protocol's own values); `aliases` maps a field to
    deprecated spellings of its flag. With `suppress_defaults`, a flag absent from the command
    line leaves no attribute, so the namespace holds only the flags the user passed.
    """
    exclude, defaults, aliases = set(exclude), defaults or {}, aliases or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        default = defaults.get(f.name, _default(f))
        help_text = f.metadata.get("help", "")
        if default not in (None, "", (), {}):
            help_text += " (default: %(default)s)"
        options: dict[str, Any] = dict(dest=f.name, help=help_text)
        options["default"] = argparse.SUPPRESS if suppress_defaults else default
        if f.metadata.get("required"):
            options.update(required=True, default=argparse.SUPPRESS)
        if _scalar_type(hints[f.name]) is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = f.metadata.get("parse", _scalar_type(hints[f.name]))
            if "flag" in f.metadata and "choices" not in f.metadata:
                options["metavar"] = _flag(f).lstrip("-").replace("-", "_").upper()
            for key in ("choices", "nargs", "metavar"):
                if key in f.metadata:
                    options[key] = f.metadata[key]
        parser.add_argument(_flag(f), **options)
        for old in aliases.get(f.name, ()):
            old_options = {k: v for k, v in options.items() if k not in ("help", "required")}
            old_options.update(default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            parser.add_argument(old, action=_DeprecatedFlag, new_flag=_flag(f), **old_options)


def parse_command_line(
    argv: Sequence[str] | None,
    make_parser: Callable[..., argparse.ArgumentParser],
    preset_values: Callable[[str], Mapping[str, Any]] | None = None,
    preset_for: Callable[[Mapping[str, Any], Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The values of a command line by field name, the preset named by ``--preset`` applied.

    Precedence: the flags the user passed, then the preset, then the parser's defaults.
    `make_parser(suppress_defaults=...)` builds the parser (twice: once to learn which flags
    were passed). `preset_for(preset, explicit)` adapts the preset's values to the flags that
    were passed (e.g. drops what an explicit flag makes meaningless).
    """
    values = vars(make_parser(suppress_defaults=False).parse_args(argv))
    explicit = vars(make_parser(suppress_defaults=True).parse_args(argv))
    preset = values.pop("preset", None)
    explicit.pop("preset", None)
    if preset is not None and preset_values is not None:
        chosen = preset_values(preset)
        values.update(preset_for(chosen, explicit) if preset_for is not None else chosen)
    values.update(explicit)
    return values


def split_fields(values: Mapping[str, Any], cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """`values` split into the fields of `cls` and the rest."""
    names = {f.name for f in dataclasses.fields(cls)}
    own = {k: v for k, v in values.items() if k in names}
    return own, {k: v for k, v in values.items() if k not in names}


def parse(
    cls: type, argv: Sequence[str] | None, *, prog: str | None = None, description: str = ""
) -> dict[str, Any]:
    """The values of a command line made of `cls`'s flags alone, by field name."""
    parser = ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser, cls)
    return vars(parser.parse_args(argv))


def methods_option(methods: Sequence[str], help: str = "Methods to run.") -> Any:
    """``--methods``: which of `methods` to run (all by default; old optimizer names accepted)."""
    from experiments import optimizer_registry

    return option(
        tuple(methods),
        help,
        nargs="+",
        parse=optimizer_registry.canonical_name,
        choices=tuple(methods),
    )
