"""The command lines: flags derived from the config dataclasses, and one runner for every command.

A config dataclass is the one place a default lives: `option(default, help)` puts the
flag's help beside it, `define_flags(Config)` makes one absl flag per field (its name,
type, default and help), and `config_from_flags(Config)` builds the config back from the
parsed flags. Flagfiles (`--flagfile=flags/mask_resnet.flags`) work as absl's always do.

A field's `option()` may declare the values it accepts (`minimum=`, `exclusive_maximum=`,
`choices=`, ...): `define_flags` registers absl validators from them, and
`check_constraints(config)` makes the same checks on a config built in Python, so a config's
`validate()` keeps only what involves several fields. Options dataclasses (a model's
--model_option keys) take values by their fields' types: `parse_value` reads a flag's text,
`coerce_value` a value from Python or JSON.

`run(main)` is every command's `if __name__ == "__main__"`: stray arguments are a usage
error, a bad flag value or a UserError prints one line `error: ...` and exits 2, and INFO
logging (absl's, TensorFlow's) stays off unless --verbosity is given.

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


def option(default=dataclasses.MISSING, help: str = "", *, minimum=None, maximum=None, exclusive_minimum=None,
           exclusive_maximum=None, choices=None, flag: str | None = None, aliases: tuple[str, ...] = (),
           parse: Callable | None = None, unparse: Callable | None = None, details: Callable[[], str] | None = None):
    """A dataclass field with its flag's help and the values it accepts.

    minimum / maximum: the smallest / largest value allowed; exclusive_minimum / exclusive_maximum:
    a bound the value must stay strictly above / below (JSON Schema's names); choices: the allowed
    values (a str field becomes an enum flag). A tuple's items are checked one by one; None, the
    "not given" of an optional field, always passes. `define_flags` registers absl validators
    from them and `check_constraints` checks a config built in Python against the same.
    flag: the flag's name when not the field's; aliases: more names for the flag;
    parse / unparse: for fields a flag cannot hold directly (str -> value, value -> str);
    details: more help, computed only when --help is shown (e.g. what needs every model imported).
    """
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "exclusive_minimum": exclusive_minimum,
                "exclusive_maximum": exclusive_maximum, "choices": choices, "flag": flag, "aliases": tuple(aliases),
                "parse": parse, "unparse": unparse, "details": details}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ------------------------------------------------------------------------------------------------
# Constraints.


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)


def _range_text(meta) -> str | None:
    """"at least 1", "between 0 and 1 (exclusive)", "in [0, 1)", ... for the field's bounds (None without)."""
    low, high = meta.get("minimum"), meta.get("maximum")
    low_open, high_open = meta.get("exclusive_minimum"), meta.get("exclusive_maximum")
    lower = (_shown(low), "[") if low is not None else (_shown(low_open), "(") if low_open is not None else None
    upper = (_shown(high), "]") if high is not None else (_shown(high_open), ")") if high_open is not None else None
    if lower and upper:
        if lower[1] == "[" and upper[1] == "]":
            return f"between {lower[0]} and {upper[0]}"
        if lower[1] == "(" and upper[1] == ")":
            return f"between {lower[0]} and {upper[0]} (exclusive)"
        return f"in {lower[1]}{lower[0]}, {upper[0]}{upper[1]}"
    if lower:
        return f"at least {lower[0]}" if lower[1] == "[" else f"greater than {lower[0]}"
    if upper:
        return f"at most {upper[0]}" if upper[1] == "]" else f"less than {upper[0]}"
    return None


def _breaks_range(meta, item) -> bool:
    return ((meta.get("minimum") is not None and item < meta["minimum"])
            or (meta.get("maximum") is not None and item > meta["maximum"])
            or (meta.get("exclusive_minimum") is not None and item <= meta["exclusive_minimum"])
            or (meta.get("exclusive_maximum") is not None and item >= meta["exclusive_maximum"]))


def constraint_text(field: dataclasses.Field) -> str | None:
    """What the field's constraints ask, as help and errors say it ("at least 1"), or None without any."""
    meta = field.metadata
    if meta.get("choices"):
        return f"one of {', '.join(map(str, meta['choices']))}"
    return _range_text(meta)


def violation(field: dataclasses.Field, value) -> str | None:
    """Why `value` breaks the field's declared constraints ("must be at least 1, not 0"), else None."""
    meta = field.metadata
    for item in value if isinstance(value, (tuple, list)) else (value,):
        if item is None or isinstance(item, (tuple, list, dict)):
            continue
        if (meta.get("choices") and item not in meta["choices"]) or (
                not meta.get("choices") and isinstance(item, (int, float)) and _breaks_range(meta, item)):
            return f"must be {constraint_text(field)}, not {_shown(item)}"
    return None


def check_constraints(config, label: Callable[[str], str] | None = None) -> None:
    """Raises the one-line UserError of the first field of `config` (and of the configs it holds)
    that breaks its declared constraints: the check absl's validators make for flags, for a config
    built in Python. label(field name) names it in the message; by default its flag, --name."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            check_constraints(value, label)
            continue
        problem = violation(field, value)
        if problem:
            name = label(field.name) if label else f"--{_flag_name(field)}"
            raise UserError(f"{name} {problem}")


# ------------------------------------------------------------------------------------------------
# Typed values: a flag's text, or a value from Python or JSON, as a field's type wants it.


def _base_type(annotation):
    """int for `int`, `int | None` and `Optional[int]`; the annotation itself otherwise."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _allows_none(annotation) -> bool:
    return (isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union) and \
        type(None) in typing.get_args(annotation)


def type_name(annotation) -> str:
    """"int", "float or None", "tuple of int", "dict of str to float", ... as help shows a field's type."""
    kind = _base_type(annotation)
    origin, args = typing.get_origin(kind) or kind, typing.get_args(kind)
    if origin is tuple:
        items = args[:1] if len(args) == 2 and args[1] is Ellipsis else args
        name = f"tuple of {' and '.join(type_name(item) for item in items)}" if items else "tuple"
    elif origin is dict:
        name = f"dict of {type_name(args[0])} to {type_name(args[1])}" if args else "dict"
    else:
        name = getattr(kind, "__name__", str(kind))
    return f"{name} or None" if _allows_none(annotation) else name


_TRUE, _FALSE = ("true", "t", "yes", "1"), ("false", "f", "no", "0")


def parse_value(text: str, annotation):
    """A flag's text as a value of the field type `annotation`: str as it is; int, float and bool
    (true/false, yes/no, 1/0) by their syntax; tuples and dicts as Python literals ("(64, 128)",
    "64,128", "{'mrcnn_class': 8.0}"); "None" for an optional field. Raises ValueError."""
    if _allows_none(annotation) and text == "None":
        return None
    kind = _base_type(annotation)
    if kind is str:
        return text
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"expected true or false, got {text!r}")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"expected {kind.__name__}, got {text!r}") from None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if typing.get_args(kind)[:1] == (str,) and typing.get_origin(kind) is tuple:
            return tuple(item.strip() for item in text.split(",") if item.strip())  # view,sex -> ("view", "sex")
        raise ValueError(f"expected a {type_name(annotation)} as a Python literal, got {text!r}") from None
    return coerce_value(value, annotation)


def coerce_value(value, annotation):
    """`value` as the field type `annotation` holds it: strings parsed (`parse_value`), lists (from
    JSON) as tuples, ints as floats, items and dict entries likewise. Raises ValueError for a value
    of another type."""
    if isinstance(value, str) and (_base_type(annotation) is not str or value == "None"):
        return parse_value(value, annotation)
    if value is None and _allows_none(annotation):
        return None
    kind = _base_type(annotation)
    origin, args = typing.get_origin(kind) or kind, typing.get_args(kind)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            value = (value,)
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ValueError(f"expected {len(args)} items, got {len(value)}: {value!r}")
        items = [args[0]] * len(value) if args and args[-1] is Ellipsis else args or [typing.Any] * len(value)
        return tuple(coerce_value(item, item_type) for item, item_type in zip(value, items))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a {type_name(annotation)}, got {value!r}")
        key_type, value_type = args or (typing.Any, typing.Any)
        return {coerce_value(k, key_type): coerce_value(v, value_type) for k, v in value.items()}
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is typing.Any or (isinstance(kind, type) and isinstance(value, kind)
                              and not (kind is int and isinstance(value, bool))):
        return value
    raise ValueError(f"expected {type_name(annotation)}, got {value!r}")


def describe_fields(config_cls) -> list[str]:
    """One line per field of `config_cls`: "name (type, default D, constraint): help", as --help shows them."""
    hints = typing.get_type_hints(config_cls)
    lines = []
    for field in dataclasses.fields(config_cls):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        facts = [type_name(hints[field.name]), f"default {default!r}"] + ([constraint_text(field)]
                                                                         if constraint_text(field) else [])
        lines.append(f"{field.name} ({', '.join(facts)}): {field.metadata.get('help', '')}")
    return lines


def parse_key_values(pairs) -> dict[str, str]:
    """["channels=32", "weights=/a/b.h5"] -> {"channels": "32", "weights": "/a/b.h5"}: the texts, which
    the options dataclass they are for parses by each field's type."""
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise UserError(f"expected key=value, got {pair!r}")
        options[key] = value
    return options


def unparse_key_values(options: dict) -> list[str]:
    """The key=value texts `parse_key_values` and the options' types give back as `options`."""
    return [f"{key}={value}" for key, value in options.items()]


# ------------------------------------------------------------------------------------------------
# Flags.

_HELP_DETAILS: dict[str, Callable[[], str]] = {}  # FLAGS' flag name -> its option's details


def _flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or field.name


def _caller_module_name() -> str:
    """The module calling `define_flags`, named as absl names modules (the main one by its path),
    so `--help` lists the flags as the command's own."""
    name = sys._getframe(2).f_globals.get("__name__", "")
    return sys.argv[0] if name == "__main__" else name


def _from_flag(field: dataclasses.Field, annotation, value):
    """A parsed flag's value as the field holds it."""
    kind, parse = _base_type(annotation), field.metadata.get("parse")
    if parse is not None and value is not None:
        return parse(value)
    if kind is dict:
        return parse_key_values(value)
    if typing.get_origin(kind) is tuple and value is not None:
        return coerce_value(tuple(value), annotation)
    return value


def _validator(field: dataclasses.Field, annotation):
    """An absl validator of the field's constraints (the flag's value converted as config_from_flags does)."""

    def check(value) -> bool:
        try:
            problem = violation(field, _from_flag(field, annotation, value))
        except (ValueError, UserError) as error:
            raise flags.ValidationError(str(error)) from error
        if problem:
            raise flags.ValidationError(problem)
        return True

    return check


def define_flags(config_cls, *, exclude=(), flag_values=FLAGS, module_name: str | None = None) -> None:
    """One absl flag per field of `config_cls` (but `exclude`); fields without a default are required.

    A field whose type is itself a config dataclass (options several commands share) gives
    that dataclass's flags, unprefixed. Declared constraints become absl validators.
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
        as_enum = bool(meta.get("choices")) and kind is str
        if as_enum:
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
        if not as_enum and (meta.get("choices") or _range_text(meta)):
            flags.register_validator(name, _validator(field, hints[field.name]), flag_values=flag_values)
        for alias in meta.get("aliases", ()):
            flags.DEFINE_alias(alias, name, **common)
        if meta.get("details") is not None and flag_values is FLAGS:
            _HELP_DETAILS[name] = meta["details"]
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
        try:
            values[field.name] = _from_flag(field, hints[field.name], flag_values[_flag_name(field)].value)
        except (ValueError, UserError) as error:
            raise UserError(f"--{_flag_name(field)}: {error}") from error
    return config_cls(**values)


def explicit_fields(config_cls, *, flag_values=FLAGS) -> set[str]:
    """Names of the fields of `config_cls` (and of the configs it holds) whose flags were given, on
    the command line or in a flagfile (an alias counts for its flag)."""
    hints = typing.get_type_hints(config_cls)
    given = set()
    for field in dataclasses.fields(config_cls):
        if dataclasses.is_dataclass(hints[field.name]):
            given |= explicit_fields(hints[field.name], flag_values=flag_values)
        elif _flag_name(field) in flag_values and flag_values[_flag_name(field)].present:
            given.add(field.name)
    return given


def flags_from_config(config) -> list[str]:
    """The command-line flags that `config_from_flags` turns back into `config` (a flagfile's lines).

    Every field is written, defaults too, so the flags stand on their own. A flagfile has one flag
    a line and no escapes, so a value holding a line break (which would write a flag of its own) is
    refused: UserError.
    """
    lines = _flag_lines(config)
    for line in lines:
        if "\n" in line or "\r" in line:  # absl reads flagfiles with universal newlines
            name, _, value = line.partition("=")
            raise UserError(f"{name} cannot be written as a flag: its value {value!r} holds a line break")
    return lines


def _flag_lines(config) -> list[str]:
    hints = typing.get_type_hints(type(config))
    lines = []
    for field in dataclasses.fields(config):
        value, name, meta = getattr(config, field.name), _flag_name(field), field.metadata
        kind = _base_type(hints[field.name])
        if dataclasses.is_dataclass(kind):
            lines += _flag_lines(value)
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


def _add_help_details(argv) -> None:
    """Appends each option's `details` to its flag's help when the command line asks for help."""
    if any(re.fullmatch(r"--?(\?|help\w*)(=.*)?", arg) for arg in argv[1:]):
        for name, details in _HELP_DETAILS.items():
            FLAGS[name].help = f"{FLAGS[name].help}\n{details()}"


def _parse_flags(argv):
    """absl's parsing, but a bad flag value (a type, a choice, a declared constraint) is one line
    `error: flag --name=value: ...` and exit status 2, as a UserError is."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        print(f"error: {'; '.join(str(error).splitlines())}", file=sys.stderr)
        sys.exit(2)


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

    _add_help_details(sys.argv)
    app.run(absl_main, flags_parser=_parse_flags)
