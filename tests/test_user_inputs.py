"""Units of custom.user_inputs: strict booleans, typed options, the command line as typed, literal pins."""

from __future__ import annotations

import json

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


def test_pinned_values_are_public_config_content_read_as_nothing_else():
    from custom.user_inputs import LITERAL_TARGET, pin_values

    parser = ConfigParser({"prompt": "default", "paths": [], "both": "$[@prompt, @paths]"})
    parser.parse()
    pin_values(parser, {"prompt": "lesion #2 @ segment 4 $x %y", "paths": ["$a", "@b", {"_target_": "os.system"}]})
    assert parser["prompt"]["_target_"] == LITERAL_TARGET  # a component of MONAI's own kind, its text encoded
    assert parser.get_parsed_content("both") == ["lesion #2 @ segment 4 $x %y", ["$a", "@b", {"_target_": "os.system"}]]


def test_a_config_expression_finds_its_parser_and_pins_between_initialize_steps(tmp_path):
    """The one MONAI internal the guard relies on (running_parser: expressions are evaluated inside
    ConfigParser.get_parsed_content), and pins made while ``initialize`` runs; this fails if MONAI changes either."""
    from monai.bundle import ConfigWorkflow

    config = {
        "imports": ["$from custom.user_inputs import running_parser", "$from custom.user_inputs import pin"],
        "prompt": "default",
        "items": "$[@prompt]",
        "initialize": ["$pin(running_parser(), 'prompt', '$__import__(\"os\").getcwd()')", "$@items"],
        "run": [],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    flow = ConfigWorkflow(config_file=str(tmp_path / "config.json"), logging_file=False, workflow_type=None)
    assert flow.initialize() == [None, ['$__import__("os").getcwd()']]


def test_the_guard_reads_its_tables_without_resolving_a_setting(tmp_path):
    from monai.bundle import ConfigWorkflow

    marker = tmp_path / "ran"
    config = {
        "imports": ["$from custom.user_inputs import guard_overrides"],
        "debug": f"$__import__('os').mkdir({str(marker)!r})",  # config code where the guard expects a switch
        "user_data": ["prompt"],
        "prompt": "default",
        "initialize": ["$guard_overrides(argv=[])"],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    flow = ConfigWorkflow(config_file=str(tmp_path / "config.json"), logging_file=False, workflow_type=None)
    with pytest.raises(RuntimeError) as raised:
        flow.initialize()
    assert isinstance(raised.value.__cause__, OptionError) and "--debug must be true or false" in str(
        raised.value.__cause__
    )
    assert not marker.exists()


def test_an_option_of_another_workflow_is_refused_and_help_is_answered(capsys):
    from custom.options import EVALUATION
    from custom.user_inputs import _command_line_values, answer_help

    files = ["bundle/configs/inference.json", "bundle/configs/evaluate.json"]
    for name in ("prompt", "displayable_configs#prompt", "image"):
        with pytest.raises(OptionError, match=f"--{name} is an option of inference, not of evaluation"):
            _command_line_values({name: "x"}, files, user_data=[], workflow=EVALUATION)
    assert _command_line_values({"split": "validation"}, files, user_data=["split"], workflow=EVALUATION)
    assert command_line_options([MAIN, "run", "--config_file", "c.json", "-h"])["help"] is True
    with pytest.raises(SystemExit) as ended:
        answer_help(files, [MAIN, "run", "evaluating", "--config_file", str(files), "--help"])
    assert ended.value.code == 0
    printed = capsys.readouterr().out
    assert (
        printed.startswith('python -m monai.bundle run evaluating --config_file "[')
        and "  --split (default: " in printed
    )
