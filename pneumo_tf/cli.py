"""The command lines: flags derived from the config dataclasses, and one runner for every command.

A config dataclass is the one place a default lives: `option(default, help)` puts the
flag's help beside it, `define_flags(Config)` makes one absl flag per field (its name,
type, default and help), and `config_from_flags(Config)` builds the config back from the
parsed flags. Flagfiles (`--flagfile=flags/mask_resnet.flags`) work as absl's always do.

`run(main)` is every command's `if __name__ == "__main__"`: stray arguments are a usage
error, a UserError prints one line `error: ...` and exits 2, and INFO logging (absl's,
TensorFlow's) stays off unless --verbosity is given.

`import_tensorflow_quietly()`, called by a command module before it imports anything that
imports TensorFlow, keeps TensorFlow's start-up logging (CUDA probing on CPU machines, CPU
feature notes, oneDNN) off the terminal, unless the user set TF_CPP_MIN_LOG_LEVEL or passed
--verbosity=1 (absl's flag; -v 1 too). No TensorFlow in this module itself: the converter's
command never loads it.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Callable

from absl import app, flags, logging as absl_logging

from pneumo_tf.errors import UserError

FLAGS = flags.FLAGS


def option(default=dataclasses.MISSING, help: str = "", *, choices=None, flag: str | None = None,
           parse: Callable | None = None, unparse: Callable | None = None):
    """A dataclass field with its flag's help.

    choices: the allowed values (an enum flag); flag: the flag's name when not the field's;
    parse / unparse: for fields a flag cannot hold directly (str -> value, value -> str).
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "parse": parse, "unparse": unparse}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def parse_key_values(pairs) -> dict:
    """["channels=32", "weights=/a/b.h5"] -> {"channels": 32, "weights": "/a/b.h5"} (Python literals, else strings)."""
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise UserError(f"expected key=value, got {pair!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a plain string such as a path
    return options


def unparse_key_values(options: dict) -> list[str]:
    return [f"{key}={value}" for key, value in options.items()]


def _base_type(annotation):
    """int for `int`, `int | None` and `Optional[int]`; the annotation itself otherwise."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or field.name


def _caller_module_name() -> str:
    """The module calling `define_flags`, named as absl names modules (the main one by its path),
    so `--help` lists the flags as the command's own."""
    name = sys._getframe(2).f_globals.get("__name__", "")
    return sys.argv[0] if name == "__main__" else name


def define_flags(config_cls, *, exclude=(), flag_values=FLAGS, module_name: str | None = None) -> None:
    """One absl flag per field of `config_cls` (but `exclude`); fields without a default are required.

    A field whose type is itself a config dataclass (options several commands share) gives
    that dataclass's flags, unprefixed.
    """
    hints = typing.get_type_hints(config_cls)
    module_name = module_name or _caller_module_name()
    common = {"flag_values": flag_values, "module_name": module_name}
    for field in dataclasses.fields(config_cls):
        if field.name in exclude:
            continue
        if dataclasses.is_dataclass(hints[field.name]):
            define_flags(hints[field.name], flag_values=flag_values, module_name=module_name)
            continue
        name, meta = _flag_name(field), field.metadata
        help_text = meta.get("help") or field.name
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        kind = _base_type(hints[field.name])
        if meta.get("unparse") is not None and default is not None:
            default = meta["unparse"](default)
        if meta.get("choices"):
            flags.DEFINE_enum(name, default, list(meta["choices"]), help_text, **common)
        elif kind is dict:
            flags.DEFINE_multi_string(name, default or [], help_text, **common)
        elif kind is bool:
            flags.DEFINE_bool(name, default, help_text, **common)
        elif kind is int:
            flags.DEFINE_integer(name, default, help_text, **common)
        elif kind is float:
            flags.DEFINE_float(name, default, help_text, **common)
        elif typing.get_origin(kind) is tuple and meta.get("parse") is None:
            flags.DEFINE_list(name, [str(v) for v in default or ()], help_text, **common)
        else:
            flags.DEFINE_string(name, default, help_text, **common)
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            flags.mark_flag_as_required(name, flag_values=flag_values)


def config_from_flags(config_cls, *, flag_values=FLAGS, **values):
    """`config_cls` built from the parsed flags (fields named in `values` take those instead)."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.name in values:
            continue
        if dataclasses.is_dataclass(hints[field.name]):
            values[field.name] = config_from_flags(hints[field.name], flag_values=flag_values)
            continue
        if _flag_name(field) not in flag_values:
            continue
        value = flag_values[_flag_name(field)].value
        kind = _base_type(hints[field.name])
        parse = field.metadata.get("parse")
        try:
            if parse is not None and value is not None:
                value = parse(value)
            elif kind is dict:
                value = parse_key_values(value)
            elif typing.get_origin(kind) is tuple and value is not None:
                item = typing.get_args(kind)[0]
                value = tuple(item(v) for v in value)
        except (ValueError, UserError) as error:
            raise UserError(f"--{_flag_name(field)}: {error}") from error
        values[field.name] = value
    return config_cls(**values)


def flags_from_config(config) -> list[str]:
    """The command-line flags that `config_from_flags` turns back into `config` (a flagfile's lines).

    Every field is written, defaults too, so the flags stand on their own.
    """
    hints = typing.get_type_hints(type(config))
    lines = []
    for field in dataclasses.fields(config):
        value, name, meta = getattr(config, field.name), _flag_name(field), field.metadata
        kind = _base_type(hints[field.name])
        if dataclasses.is_dataclass(kind):
            lines += flags_from_config(value)
        elif meta.get("unparse") is not None:
            unparsed = meta["unparse"](value) if value is not None else ""
            lines += [f"--{name}={item}" for item in unparsed] if kind is dict else [f"--{name}={unparsed}"]
        elif value is None:
            continue  # the field's default is None too: a flag cannot say None otherwise
        elif kind is bool:
            lines.append(f"--{name}" if value else f"--no{name}")
        elif typing.get_origin(kind) is tuple:
            lines.append(f"--{name}={','.join(map(str, value))}")
        else:
            lines.append(f"--{name}={value}")
    return lines


@contextlib.contextmanager
def _stderr_silenced():
    """Points file descriptor 2 at /dev/null for the block: TensorFlow's C++ start-up logging writes
    there directly, before its own log level applies."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _verbose_requested(argv) -> bool:
    """Whether the command line asks absl for --verbosity (or -v) of 1 or more; read before absl parses it."""
    text = " ".join(argv[1:])
    match = re.search(r"(?:^|\s)(?:--verbosity|--v|-v)[=\s]+(-?\d+)", text)
    return bool(match) and int(match.group(1)) >= 1


def import_tensorflow_quietly(argv=None) -> None:
    """Imports TensorFlow and probes its devices without the start-up noise (see the module docstring);
    later C++ logs then show errors only."""
    argv = sys.argv if argv is None else argv
    if _verbose_requested(argv) or "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    with _stderr_silenced():
        import tensorflow as tf

        # Probes CUDA ("failed call to cuInit" on CPU machines) without creating logical
        # devices, so --cpu_replicas can still split the CPU afterwards.
        tf.config.list_physical_devices()


def run(main: Callable[[], int | None]) -> None:
    """Runs a command's `main()` under absl with the rules in the module docstring."""

    def absl_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        if not FLAGS["verbosity"].present:
            # absl and TensorFlow log INFO lines (SavedModel writing, strategy set-up) by default.
            absl_logging.set_verbosity(absl_logging.WARNING)
            logging.getLogger("tensorflow").setLevel(logging.WARNING)
        try:
            return main() or 0
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    app.run(absl_main)
