"""Command-line pieces shared by every script: one-line errors, argument and config-file parsing.

A script's ``main`` raises :class:`UserError` for bad input and runs under :func:`run_main`, which prints
it as one line and exits with status 2. Config files (``--config``) are YAML whose keys are the scripts'
argument names; precedence is script default < config file < command line. A config file is checked
like a command line: an unknown key, a value of the wrong type or outside an argument's choices is an
error naming the key.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import yaml


class UserError(Exception):
    """Bad input from the user: the scripts print it as one line and exit with status 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: ...``), without the usage dump."""

    def error(self, message: str):  # noqa: D102 (argparse's contract: print and exit)
        self.exit(2, f'{self.prog}: error: {message}\n')


def run_main(main, prog: str) -> None:
    """Call ``main()``; turn a :class:`UserError` into one line on stderr and exit status 2, and Ctrl-C
    (``KeyboardInterrupt``) into one line and exit status 130 (128 + SIGINT, the shell's convention)."""
    try:
        main()
    except UserError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        sys.exit(130)


# What timm's and torch's factories raise for a value they reject (timm asserts in places, and a model
# whose kwargs do not fit its forward raises AttributeError on the first batch).
LIBRARY_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError, AssertionError, RuntimeError,
                  NotImplementedError)


def short_reason(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its class name if it has none), shortened to ``limit``
    characters at a sentence or word boundary, so that a one-line error never ends mid-word."""
    text = str(error).strip().splitlines()[0].strip() if str(error).strip() else error.__class__.__name__
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = cut.rfind('. ')
    return cut[:end + 1] if end > limit // 3 else cut[:cut.rfind(' ')].rstrip(',;:') + ' ...'


def first_line(error: BaseException) -> str:
    """An exception as one short line: its class and :func:`short_reason`."""
    return f'{error.__class__.__name__}: {short_reason(error)}' if str(error).strip() else error.__class__.__name__


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is torch running out of device (``torch.OutOfMemoryError``) or host memory (the CPU
    allocator's RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


@contextmanager
def rejected_as(option: str) -> Iterator[None]:
    """Turn a library's rejection of a value (see ``LIBRARY_ERRORS``) inside the block into a
    :class:`UserError` that starts with ``option``, e.g. ``--opt 'adamx': ValueError: ...``. Out-of-memory
    errors (:func:`is_out_of_memory`) pass through: they say nothing about the option."""
    try:
        yield
    except UserError:
        raise
    except LIBRARY_ERRORS as e:
        if is_out_of_memory(e):  # no bad option value: a smaller batch or model may fit
            raise
        raise UserError(f'{option}: {first_line(e)}') from None


def yaml_mapping(text: str) -> dict:
    """argparse ``type`` for dict-valued options given on the command line as YAML/JSON: ``'{a: 1}'``."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f'not a YAML mapping: {text!r} ({e.__class__.__name__})') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'not a YAML mapping: {text!r}')
    return value


def read_yaml_config(path: str) -> dict[str, Any]:
    """Read a config file into a dict; missing, unreadable or malformed files raise :class:`UserError`."""
    try:
        with open(path, encoding='utf-8') as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f'cannot read config {path}: {e.strerror}') from None
    except yaml.YAMLError as e:
        where = getattr(e, 'problem_mark', None)
        line = f' line {where.line + 1}' if where is not None else ''
        problem = getattr(e, 'problem', None) or e.__class__.__name__
        raise UserError(f'malformed YAML in config {path}{line}: {problem}') from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UserError(f'config {path} must be a mapping of argument names to values, not {type(config).__name__}')
    return config


def _coerce(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """Check and convert one config value the way argparse would convert it from the command line."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise UserError(f'config {path}: {key} must be true or false, not {value!r}')
        return value
    if action.nargs == '?' and action.const is not None and isinstance(value, bool):
        return action.const if value else None  # `torch_compile: true` means the bare flag
    many = action.nargs not in (None, '?')
    values = value if many else [value]
    if many and not isinstance(value, (list, tuple)):
        raise UserError(f'config {path}: {key} must be a list, not {value!r}')
    if isinstance(action.nargs, int) and len(values) != action.nargs:
        raise UserError(f'config {path}: {key} needs {action.nargs} values, got {len(values)}')
    converted = []
    for item in values:
        if action.type is not None and not (action.type is yaml_mapping and isinstance(item, dict)):
            wrong = (bool,) if action.type is float else (bool, float) if action.type is int else ()
            if isinstance(item, wrong):
                kind = 'an integer' if action.type is int else 'a number'
                raise UserError(f'config {path}: {key} must be {kind}, not {item!r}')
            try:
                item = action.type(item if action.type in (int, float) else str(item))
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise UserError(f'config {path}: invalid value for {key}: {item!r}') from None
        if action.choices is not None and item not in action.choices:
            raise UserError(f'config {path}: {key} must be one of {", ".join(map(str, action.choices))}, '
                            f'not {item!r}')
        converted.append(item)
    return converted if many else converted[0]


def config_defaults(parser: argparse.ArgumentParser, path: str, accepted: set[str] | None = None) -> dict[str, Any]:
    """The values of config file ``path`` for ``parser``, checked and converted.

    ``accepted`` lists extra keys that are valid in the file but not ``parser``'s (``validate.py`` reads
    a training config and uses only the keys it has).
    """
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}
    defaults = {}
    for key, value in read_yaml_config(path).items():
        if key in actions:
            defaults[key] = _coerce(actions[key], key, value, path)
        elif accepted is None or key not in accepted:
            raise UserError(f'unknown key {key!r} in config {path}'
                            + (f' (did you mean {key.replace("-", "_")!r}?)' if '-' in key else ''))
    return defaults


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
               accepted: set[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with ``parser`` after applying the ``--config`` file's values as defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--config', '-c', default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**config_defaults(parser, known.config, accepted))
    return parser.parse_args(argv)


def resolved_config(args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    """The values of ``keys`` in ``args`` as plain YAML types (tuples become lists)."""
    def plain(value):
        return list(value) if isinstance(value, tuple) else value
    return {key: plain(getattr(args, key)) for key in keys}
