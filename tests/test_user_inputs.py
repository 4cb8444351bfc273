"""Units of custom.user_inputs: strict booleans, typed options, the command line as typed, literal pins."""

from __future__ import annotations

import pytest
from monai.bundle import ConfigParser

from custom.user_inputs import OptionError, _typed, as_bool, command_line_options, pin

MAIN = "/env/lib/python3.11/site-packages/monai/bundle/__main__.py"


@pytest.mark.parametrize("value, expected", [(True, True), ("false", False), ("No", False), ("YES", True), ("1", True),
                                             (0, False), ("off", False)])  # fmt: skip
def test_booleans_parse_strictly(value, expected):
    assert as_bool(value, "overwrite") is expected


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, None, "truee"])
def test_anything_else_is_not_a_boolean(value):
    with pytest.raises(OptionError, match="--overwrite must be true or false"):
        as_bool(value, "overwrite")


def test_options_take_the_type_of_their_default():
    assert _typed("3", 150, "epochs") == 3 and isinstance(_typed("3", 150, "epochs"), int)
    assert _typed("0.5", 2.0, "in_plane_spacing") == 0.5
    assert _typed("[96, 96]", [192, 192], "slice_size") == [96, 96]
    for value, default in (("abc", 150), ("3.5", 150), ("nan", 2.0), ("inf", 2.0), ("abc", [1, 2])):
        with pytest.raises(OptionError):
            _typed(value, default, "option")
    for code in ("$@other", "@other", "%other", "$True", " $1"):  # config code in a command-line value is refused
        with pytest.raises(OptionError, match="config code"):
            _typed(code, 2.0, "x")


def test_command_line_is_read_as_typed_only_for_monai_bundle():
    argv = [MAIN, "run", "inference", "--config_file", "c.json", "--prompt", "$x", "--overwrite", "--n=3"]
    assert command_line_options(argv) == {"config_file": "c.json", "prompt": "$x", "overwrite": True, "n": "3"}
    assert command_line_options(["pytest", "--prompt", "x"]) is None


def test_a_pinned_value_resolves_verbatim():
    parser = ConfigParser({"prompt": "default", "checkpoint": "model.pt", "data": "$[@prompt]", "nested": {"v": 1}})
    parser.parse()
    pin(parser, "prompt", "$__import__('os').getcwd()")
    pin(parser, "checkpoint", "@prompt")
    pin(parser, "nested#v", 2.5)
    assert parser.get_parsed_content("data") == ["$__import__('os').getcwd()"]
    assert parser.get_parsed_content("checkpoint") == "@prompt"
    assert parser.get_parsed_content("nested") == {"v": 2.5}
