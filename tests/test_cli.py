"""pneumo_tf.cli: typed values of every option kind, declared constraints (absl validators and configs
built in Python), the flags given explicitly, and the one-line error of a bad flag value."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
from absl import flags

from pneumo_tf import cli
from pneumo_tf.cli import option
from pneumo_tf.errors import UserError


@dataclasses.dataclass(frozen=True)
class Inner:
    ratio: float = option(0.5, "A ratio.", minimum=0.0, exclusive_maximum=1.0)


@dataclasses.dataclass(frozen=True)
class Example:
    count: int = option(1, "At least one.", minimum=1)
    rate: float = option(0.1, "Above 0.", exclusive_minimum=0.0)
    probability: float | None = option(None, "In (0, 1) when given.", exclusive_minimum=0.0, exclusive_maximum=1.0)
    port: int = option(8080, "A port.", minimum=0, maximum=65535)
    depth: int = option(8, "8 or 16.", choices=(8, 16))
    mode: str = option("fast", "A word.", choices=("fast", "slow"))
    sizes: tuple[int, ...] = option((1, 2), "Each at least 1.", minimum=1, aliases=("size_list",))
    inner: Inner = option(Inner())


@pytest.mark.parametrize(("text", "annotation", "value"), [
    ("32", int, 32),
    ("0.25", float, 0.25),
    ("1e-3", float, 0.001),
    ("true", bool, True), ("False", bool, False), ("no", bool, False), ("1", bool, True),
    ("bilinear", str, "bilinear"),
    ("/a b/c.h5", str | None, "/a b/c.h5"),
    ("None", str | None, None),
    ("None", int | None, None),
    ("(3,4,6,3)", tuple[int, ...], (3, 4, 6, 3)),
    ("64,128", tuple[int, ...], (64, 128)),
    ("64", tuple[int, ...], (64,)),
    ("[0.1, 1]", tuple[float, ...], (0.1, 1.0)),
    ("(1, 2)", tuple[float, float], (1.0, 2.0)),
    ("{'mrcnn_class': 8}", dict[str, float], {"mrcnn_class": 8.0}),
    ("(1, 1, 1, 1)", tuple[int, ...] | None, (1, 1, 1, 1)),
])
def test_parse_value_reads_every_option_kind(text, annotation, value):
    parsed = cli.parse_value(text, annotation)
    assert parsed == value and type(parsed) is type(value)
    if isinstance(value, (tuple, dict)):
        assert [type(item) for item in (value.values() if isinstance(value, dict) else value)] == \
            [type(item) for item in (parsed.values() if isinstance(parsed, dict) else parsed)]


@pytest.mark.parametrize(("text", "annotation", "message"), [
    ("3.5", int, "expected int, got '3.5'"),
    ("many", float, "expected float, got 'many'"),
    ("maybe", bool, "expected true or false, got 'maybe'"),
    ("(1, x)", tuple[int, ...], "expected a tuple of int as a Python literal"),
    ("(1, 2.5)", tuple[int, ...], "expected int, got 2.5"),
    ("(1, 2, 3)", tuple[float, float], "expected 2 items"),
    ("[1, 2]", dict[str, float], "expected a dict of str to float"),
    ("{'a': 'b'}", dict[str, float], "expected float, got 'b'"),
])
def test_parse_value_refuses_what_the_type_cannot_hold(text, annotation, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cli.parse_value(text, annotation)


def test_coerce_value_takes_python_and_json_values():
    assert cli.coerce_value([64, 64], tuple[int, ...]) == (64, 64)  # a JSON list
    assert cli.coerce_value(2, float) == 2.0 and type(cli.coerce_value(2, float)) is float
    assert cli.coerce_value("7", int) == 7  # a flag's text
    assert cli.coerce_value({"a": 1}, dict[str, float]) == {"a": 1.0}
    with pytest.raises(ValueError, match="expected int, got True"):
        cli.coerce_value(True, int)
    with pytest.raises(ValueError, match="expected str, got 3"):
        cli.coerce_value(3, str)
    assert cli.type_name(tuple[int, ...] | None) == "tuple of int or None"
    assert cli.type_name(dict[str, float]) == "dict of str to float"


def test_key_values_stay_texts_for_the_options_to_parse():
    assert cli.parse_key_values(["channels=32", "weights=/a b/c.h5", "blocks=(1,1)"]) == {
        "channels": "32", "weights": "/a b/c.h5", "blocks": "(1,1)"}
    with pytest.raises(UserError, match="expected key=value, got 'channels'"):
        cli.parse_key_values(["channels"])


@pytest.mark.parametrize(("changes", "message"), [
    ({"count": 0}, "--count must be at least 1, not 0"),
    ({"rate": 0.0}, "--rate must be greater than 0, not 0"),
    ({"probability": 1.0}, r"--probability must be between 0 and 1 \(exclusive\), not 1"),
    ({"port": 70000}, "--port must be between 0 and 65535, not 70000"),
    ({"depth": 12}, "--depth must be one of 8, 16, not 12"),
    ({"mode": "medium"}, "--mode must be one of fast, slow, not 'medium'"),
    ({"sizes": (3, 0)}, "--sizes must be at least 1, not 0"),
    ({"inner": Inner(ratio=1.0)}, r"--ratio must be in \[0, 1\), not 1"),
])
def test_a_config_built_in_python_is_checked_against_its_constraints(changes, message):
    cli.check_constraints(Example())  # the defaults keep every constraint
    cli.check_constraints(Example(probability=None))  # an optional field left out
    with pytest.raises(UserError, match=f"^{message}$"):
        cli.check_constraints(dataclasses.replace(Example(), **changes))


def _parsed(*args) -> flags.FlagValues:
    values = flags.FlagValues()
    cli.define_flags(Example, flag_values=values)
    values(["command", *args])
    return values


@pytest.mark.parametrize(("flag", "message"), [
    ("--count=0", "flag --count=0: must be at least 1, not 0"),
    ("--probability=1.5", "flag --probability=1.5: must be between 0 and 1 (exclusive), not 1.5"),
    ("--depth=12", "flag --depth=12: must be one of 8, 16, not 12"),
    ("--sizes=2,0", "flag --sizes=['2', '0']: must be at least 1, not 0"),
    ("--sizes=2,x", "flag --sizes=['2', 'x']: expected int, got 'x'"),
    ("--ratio=1", "flag --ratio=1.0: must be in [0, 1), not 1"),
])
def test_absl_validators_refuse_the_same_values(flag, message):
    with pytest.raises(flags.IllegalFlagValueError) as raised:
        _parsed(flag)
    assert str(raised.value) == message


def test_flags_give_typed_values_and_say_which_were_given():
    values = _parsed("--count=3", "--size_list=4,5", "--ratio=0.25")
    config = cli.config_from_flags(Example, flag_values=values)
    assert config == Example(count=3, sizes=(4, 5), inner=Inner(0.25))
    # An alias counts for its flag; a nested config's fields are named too.
    assert cli.explicit_fields(Example, flag_values=values) == {"count", "sizes", "ratio"}
    assert cli.explicit_fields(Example, flag_values=_parsed()) == set()


def test_describe_fields_gives_type_default_range_and_help():
    lines = cli.describe_fields(Example)
    assert lines[0] == "count (int, default 1, at least 1): At least one."
    assert "probability (float or None, default None, between 0 and 1 (exclusive)): In (0, 1) when given." in lines
    assert "depth (int, default 8, one of 8, 16): 8 or 16." in lines


def test_a_bad_flag_value_is_one_error_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pneumo_tf.train", f"--records_dir={tmp_path}",
                             f"--model_dir={tmp_path / 'run'}", "--positive_fraction=1.5"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: flag --positive_fraction=1.5: must be in [0, 1), not 1.5"], result.stderr[-2000:]


def _command_configs():
    """(config, the same with a value its declared constraints refuse, the flag, the message), per command."""
    from pneumo_tf.data.remote import ServiceConfig
    from pneumo_tf.evaluation.report import EvaluateConfig
    from pneumo_tf.inference.offline import PredictConfig
    from pneumo_tf.inference.web import ServeConfig
    from pneumo_tf.models.reading import ReadingConfig
    from pneumo_tf.records.radiograph import ConvertOptions
    from pneumo_tf.records.shards import ConvertConfig
    from pneumo_tf.records.synthetic import SynthesiseConfig
    from pneumo_tf.training.search import TuneConfig

    convert = ConvertConfig(dicom_dir="in", output_dir="out")
    predict = PredictConfig(model_dir="m", output="s.csv", records_dir="r")
    evaluate = EvaluateConfig(model_dir="m", records_dir="r")
    return [
        (convert, dataclasses.replace(convert, options=ConvertOptions(val_fraction=1.5)), "--val_fraction=1.5",
         "must be in [0, 1), not 1.5"),
        (convert, dataclasses.replace(convert, options=ConvertOptions(bit_depth=12)), "--bit_depth=12",
         "must be one of 8, 16, not 12"),
        (convert, dataclasses.replace(convert, workers=-1), "--workers=-1", "must be at least 0, not -1"),
        (predict, dataclasses.replace(predict, threshold=1.0), "--threshold=1.0",
         "must be between 0 and 1 (exclusive), not 1"),
        (predict, dataclasses.replace(predict, reading=ReadingConfig(weights=(1.0, 0.0))), "--weights=1,0",
         "must be greater than 0, not 0"),
        (evaluate, dataclasses.replace(evaluate, thresholds=(0.5, 1.0)), "--thresholds=0.5,1",
         "must be between 0 and 1 (exclusive), not 1"),
        (ServeConfig(model_dir="m"), ServeConfig(model_dir="m", port=70000), "--port=70000",
         "must be between 0 and 65535, not 70000"),
        (ServeConfig(model_dir="m"), ServeConfig(model_dir="m", max_upload_mb=0.0), "--max_upload_mb=0",
         "must be greater than 0, not 0"),
        (ServiceConfig(role="dispatcher"), ServiceConfig(role="dispatcher", port=-1), "--port=-1",
         "must be between 0 and 65535, not -1"),
        (TuneConfig(search=("x",), tune_dir="t"), TuneConfig(search=("x",), tune_dir="t", hyperband_factor=1),
         "--hyperband_factor=1", "must be at least 2, not 1"),
        (SynthesiseConfig(output_dir="o"), SynthesiseConfig(output_dir="o", workers=-2), "--workers=-2",
         "must be at least 0, not -2"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_every_commands_constraints_refuse_flags_and_configs_alike(case):
    good, bad, flag, message = _command_configs()[case]
    cli.check_constraints(good)
    name = flag.partition("=")[0]
    with pytest.raises(UserError, match=f"^{re.escape(name)} {re.escape(message)}$"):
        cli.check_constraints(bad)
    values = flags.FlagValues()
    cli.define_flags(type(good), flag_values=values)
    values(["command", *cli.flags_from_config(good)])  # the good config's flags pass
    values.unparse_flags()
    with pytest.raises(flags.IllegalFlagValueError, match=f": {re.escape(message)}$"):
        values(["command", *cli.flags_from_config(good), flag])


def test_augmentation_ranges_are_declared_and_checked():
    from pneumo_tf.data.augment import AugmentConfig

    assert AugmentConfig(contrast_range=[0.8, 1.2]).contrast_range == (0.8, 1.2)
    with pytest.raises(UserError, match="^augment flip_probability must be between 0 and 1, not 1.5$"):
        AugmentConfig(flip_probability=1.5)
    with pytest.raises(UserError, match=r"^augment zoom_range must be in \[0, 1\), not 1$"):
        AugmentConfig(zoom_range=1.0)
    with pytest.raises(UserError, match=r"^augment contrast_range must be \(low, high\) with low <= high"):
        AugmentConfig(contrast_range=(1.2, 0.8))
