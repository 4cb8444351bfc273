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


def test_what_was_given_is_told_only_for_monai_bundle_command_lines():
    from custom.user_inputs import given_on_command_line

    argv = [MAIN, "run", "inference", "--config_file", "c.json", "--image", "ct.nii.gz"]
    assert given_on_command_line(["prompt", "displayable_configs#prompt"], argv) is False
    assert given_on_command_line(["prompt", "displayable_configs#prompt"], [*argv, "--displayable_configs#prompt", "x"])
    assert given_on_command_line(["prompt"], ["pytest", "--prompt", "x"]) is None


def test_prompts_of_unreadable_words_and_ignored_inputs_are_refused():
    from custom.prompts import PromptError, check_one_input, check_prompt

    class Tokenizer:  # counts words: the character rules act before any tokenizer
        def __call__(self, text):
            return {"input_ids": text.split()}

    assert check_prompt(" the largest lesion ", tokenizer=Tokenizer()) == "the largest lesion"
    for prompt in ("\U0001f600" * 10000, "a" * 100000, "the " + "x" * 65):
        with pytest.raises(PromptError, match="characters"):
            check_prompt(prompt, tokenizer=Tokenizer())
    check_one_input("ct.nii.gz", None, None, prompt_given=True)
    check_one_input(None, None, None, prompt_given=False)  # the sample CT with its own prompt
    for args, message in (
        (("ct.nii.gz", "pairs.json", None, None), "both given"),
        (("ct.nii.gz", None, "folder", True), "both given"),
        ((None, "pairs.json", None, True), "--prompt is given with --datalist"),
        (("ct.nii.gz", None, None, False), "without --prompt"),
        ((None, None, "folder", False), "without --prompt"),
    ):
        with pytest.raises(PromptError, match=message):
            check_one_input(*args)
