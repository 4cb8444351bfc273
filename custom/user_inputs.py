"""What a user supplies to a bundle workflow is data: checked, typed, and never run as config code.

MONAI's ``ConfigParser`` reads a value that starts with ``$`` as Python and one that starts with ``@`` as a reference
to another config item, and a command-line override is such a value. Each config of this bundle therefore lists the
ids that hold user data (``"user_data"``: image paths, prompt, series uid, folders) and starts its ``initialize``
with :func:`guard_overrides`, which, before anything else reads them:

- answers ``--help`` with the options of the workflow being run (:mod:`custom.options`) and ends the process;
- refuses a command-line option that the config files do not define (``--promt``), naming the closest known one,
  and an option of another workflow (``--prompt`` in evaluation, whose config holds inference's settings too);
- pins every user-data id to its verbatim text (from the command line when the workflow was started by
  ``python -m monai.bundle``, else the value given to ``ConfigWorkflow``), so that ``@prompt`` resolves to the text
  itself and nothing in it is evaluated or resolved (:func:`pin`);
- converts the other command-line options to the type of their default strictly (``--epochs abc`` and
  ``--overwrite maybe`` are refused; booleans are ``true``/``false``/``yes``/``no``/``1``/``0``), takes text options
  (paths, device names) as the text given, refuses config code (``$``, ``@``, ``%``) in any of them, and checks the
  numeric options a config lists in ``"option_limits"`` against their ranges;
- makes the process print an :class:`~custom.errors.InputError` as one clear last line instead of a traceback
  (``--debug true`` keeps the traceback).

The guard works through MONAI's public API (``ConfigParser.__setitem__``, ``parse``, components) but for one thing
MONAI gives a config expression no handle on: the parser that evaluates it (:func:`running_parser`). The options as
typed come from the process's command line (``fire`` would have read ``--prompt "lesion #2"`` as ``lesion``).

Limits (MONAI's parser acts before any config code runs): a command-line value that starts with ``%`` is replaced
by ``ConfigParser.parse()`` as a macro, and a value ``$import <module>`` is executed by MONAI's reference resolver,
which evaluates every import statement of the config at the first resolution, before the guard runs. Closing either
would mean editing the resolver's private tables from inside its own loop, so the guard refuses them afterwards where
it can (other options) and takes the prompt as the text given. MONAI's parser also rewrites ``#`` to ``::`` in every
config string. The MONAI Label app never passes request data through overrides at all (:class:`UserDataWorkflow`).
"""

from __future__ import annotations

import ast
import base64
import difflib
import json
import sys
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.reference_resolver import ReferenceResolver

from custom.errors import InputError, find_input_error
from custom.options import INTERNAL_IDS, OPTIONS, WORKFLOWS, Workflow, help_text, merged_config, options_of, workflow_of

__all__ = [
    "OptionError",
    "UserDataWorkflow",
    "answer_help",
    "as_bool",
    "check_choice",
    "check_device",
    "command_line_options",
    "given_on_command_line",
    "guard_overrides",
    "install_error_hook",
    "literal",
    "parse_override",
    "add_set_option",
    "pin",
    "pin_values",
    "running_parser",
]

#: Arguments of ``monai.bundle run`` itself (not config ids).
MONAI_RUN_ARGS = frozenset(
    {"config_file", "meta_file", "logging_file", "args_file", "init_id", "run_id", "final_id", "tracking",
     "workflow_name", "workflow_type", "properties_path"}
)  # fmt: skip

TRUE_WORDS = frozenset({"true", "yes", "1", "on"})
FALSE_WORDS = frozenset({"false", "no", "0", "off"})


class OptionError(InputError, ValueError):
    """A command-line option or override value that the bundle cannot use."""


def as_bool(value: Any, name: str = "value") -> bool:
    """``value`` as a boolean, strictly: a bool, 0/1, or one of true/false/yes/no/on/off/1/0 (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise OptionError(f"--{name} must be true or false, got {value!r}. Pass --{name} true or --{name} false.")


# ----------------------------------------------------------------------------------------------- the command line
def _started_by_monai_bundle(argv: Sequence[str]) -> bool:
    return bool(argv) and Path(argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py")


def command_line_options(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The ``--key value`` options of a ``python -m monai.bundle <command>`` process, values as typed (strings);
    None when this process was not started that way. A ``--flag`` without a value is True (as ``fire`` reads it)."""
    argv = list(sys.argv if argv is None else argv)
    if not _started_by_monai_bundle(argv):
        return None
    options: dict[str, Any] = {}
    args = argv[2:]  # argv[1] is the command (run, verify_metadata, ...)
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "-h":
            options["help"] = True
            continue
        if not token.startswith("--") or token == "--":
            continue  # a positional argument, e.g. the run id of "run training"
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            if i < len(args) and not args[i].startswith("--"):
                value, i = args[i], i + 1
            else:
                value = True
        options[name.replace("-", "_") if name.replace("-", "_") in MONAI_RUN_ARGS else name] = value
    return options


def given_on_command_line(ids: Iterable[str], argv: Sequence[str] | None = None) -> bool | None:
    """Whether any of ``ids`` is an option of this ``python -m monai.bundle`` command line; None when the process was
    not started that way (the Python API, the MONAI Label app), where what was given cannot be told from a default."""
    options = command_line_options(argv)
    if options is None:
        return None
    wanted = {ReferenceResolver.normalize_id(i) for i in ids}
    return any(ReferenceResolver.normalize_id(name) in wanted for name in options)


def _config_files(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            pass
    return [text]


# ----------------------------------------------------------------------------------------------- the parser
def running_parser() -> ConfigParser:
    """The ``ConfigParser`` that is evaluating the config expression which calls this function.

    The one MONAI internal the guard relies on: MONAI gives a config expression no handle on its parser, and
    evaluates every expression inside ``ConfigParser.get_parsed_content`` (through its ``ReferenceResolver``), so
    the nearest caller frame whose ``self`` is a ``ConfigParser`` is it. ``tests/test_user_inputs.py`` fails if a
    MONAI release evaluates expressions otherwise.
    """
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigParser):
            return owner
        frame = frame.f_back
    raise RuntimeError("running_parser() must be called from an expression of a MONAI bundle config.")


#: The component a pinned value becomes in the config (:func:`pin`).
LITERAL_TARGET = f"{__name__}.literal"


def literal(encoded: str) -> Any:
    """The value of a pinned setting (:func:`pin`): ``encoded`` is its JSON, base64-encoded."""
    return json.loads(base64.b64decode(encoded))


def _as_literal(value: Any) -> Any:
    """``value`` as config content that MONAI's parser reads as that value and nothing else.

    Text, lists and dicts become a component of :func:`literal` whose one argument is their JSON in base64, an
    alphabet without ``$``, ``@``, ``%`` or ``#``; anything else (numbers, booleans, None) is never parsed."""
    if not isinstance(value, (str, list, dict)):
        return value
    return {"_target_": LITERAL_TARGET, "encoded": base64.b64encode(json.dumps(value).encode()).decode("ascii")}


def _pinned_value(node: Any) -> tuple[bool, Any]:
    """(True, the value) when ``node`` is a pinned value (:func:`_as_literal`), else (False, None)."""
    if isinstance(node, dict) and node.get("_target_") == LITERAL_TARGET and set(node) == {"_target_", "encoded"}:
        return True, literal(node["encoded"])
    return False, None


def pin_values(parser: ConfigParser, values: Mapping[str, Any]) -> None:
    """Make each ``@id`` of ``values`` resolve to its value exactly as given: no expression, reference or macro in
    it is read. Public ``ConfigParser`` calls only: each value is set (:func:`_as_literal`), then the config is parsed
    again, which starts its resolution afresh (safe between two expressions of ``initialize``: the next one
    parses nothing else)."""
    if not values:
        return
    for id, value in values.items():
        parser[id] = _as_literal(value)
    parser.parse(reset=True)


def pin(parser: ConfigParser, id: str, value: Any) -> None:
    """Make ``@id`` resolve to ``value`` exactly as given (:func:`pin_values`)."""
    pin_values(parser, {id: value})


def _known(config: Mapping, id: str) -> tuple[bool, list[str]]:
    """Whether ``id`` names an item of ``config`` (a new argument of an existing component counts), and the ids at
    its level for a suggestion."""
    node: Any = config
    keys = ReferenceResolver.split_id(id)
    for depth, key in enumerate(keys):
        if isinstance(node, dict):
            if key not in node:
                component = "_target_" in node and depth == len(keys) - 1
                return component, sorted(k for k in node if not k.startswith("_"))
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return False, []
    return True, []


def _default_of(config: Mapping, id: str) -> Any:
    node: Any = config
    for key in ReferenceResolver.split_id(id):
        node = node.get(key) if isinstance(node, dict) else node[int(key)]
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of a developer command's ``--set`` (a config id and its value, read as JSON when it parses)."""
    key, separator, value = text.partition("=")
    if not key or not separator:
        raise ValueError(f"--set takes KEY=VALUE (VALUE as JSON), got {text!r}.")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_set_option(parser, help: str = "a config setting (repeatable), e.g. --set referral#threshold=0.4") -> None:
    """A developer command's repeatable ``--set KEY=VALUE`` (:func:`parse_override`), gathered in ``overrides``."""
    parser.add_argument(
        "--set", dest="overrides", type=parse_override, action="append", default=[], metavar="KEY=VALUE", help=help
    )


#: What MONAI's parser reads as config code in a value: Python (``$``), a reference (``@``), a macro (``%``).
CONFIG_CODE_PREFIXES = ("$", "@", "%")


def _refuse_config_code(value: Any, name: str) -> None:
    """Refuse a command-line value of a setting that MONAI's parser would read as config code.

    No option of this bundle takes config code from the command line: a path, a device name or a switch that starts
    with ``$`` would run as Python and one that starts with ``@`` or ``%`` would copy another setting. Config files
    (``--config_file "['a.json','b.json']"``) are the place for expressions."""
    if isinstance(value, str) and value.lstrip().startswith(CONFIG_CODE_PREFIXES):
        raise OptionError(
            f"--{name} is given {value[:40]!r}, which MONAI would read as config code ({value.lstrip()[0]!r} "
            "starts an expression, a reference or a macro); command-line values are data. Pass the value itself, "
            "or put expressions in a config file given with --config_file."
        )


def _typed(value: Any, default: Any, name: str) -> Any:
    """``value`` (a command-line string or what ``fire`` made of it) converted to the type of ``default``."""
    _refuse_config_code(value, name)
    if isinstance(default, bool):
        return as_bool(value, name)
    if isinstance(default, (int, float)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or number != number or number in (float("inf"), float("-inf")):
            kind = "a whole number" if isinstance(default, int) else "a number"
            raise OptionError(f"--{name} must be {kind}, got {value!r}. Pass e.g. --{name} {default}.")
        if isinstance(default, int):
            if not number.is_integer():
                raise OptionError(f"--{name} must be a whole number, got {value!r}. Pass e.g. --{name} {default}.")
            return int(number)
        return number
    if isinstance(default, (list, dict)) and not isinstance(value, (list, dict)):
        kind = type(default)
        try:
            parsed = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, kind):
            what = "a list" if kind is list else "a JSON object"
            raise OptionError(f"--{name} must be {what}, got {value!r}. Pass e.g. --{name} '{json.dumps(default)}'.")
        return parsed
    return value


def _other_workflows_option(id: str, workflow: Workflow | None) -> str | None:
    """The workflow whose option ``id`` is (or holds) when it is no option of ``workflow``; else None."""
    if workflow is None:
        return None

    def related(option_id: str) -> bool:
        option_id = ReferenceResolver.normalize_id(option_id)
        return option_id == id or option_id.startswith(id + "::") or id.startswith(option_id + "::")

    if any(related(o.id) for o in options_of(workflow)):
        return None
    others = [o.workflows[0] for o in OPTIONS if related(o.id)]
    return others[0] if others else None


def _command_line_values(
    options: Mapping[str, Any],
    files: Sequence[str],
    user_data: Sequence[str],
    optional: Iterable[str] = (),
    workflow: Workflow | None = None,
) -> dict:
    """{id: value to pin} for the command-line options, after refusing unknown ids, options of another workflow
    than ``workflow`` and values of the wrong type; ``optional`` ids also take null (None)."""
    file_config = merged_config(files)  # merged as MONAI merges them (ids such as "train#sampler" go into place)
    values = {}
    for name, raw in options.items():
        if name in MONAI_RUN_ARGS:
            continue
        id = ReferenceResolver.normalize_id(name)
        known, siblings = _known(file_config, id)
        if not known:
            keys = ReferenceResolver.split_id(id)
            close = difflib.get_close_matches(keys[-1], siblings or list(file_config), n=1)
            hint = f" Did you mean --{'#'.join([*keys[:-1], close[0]])}?" if close else ""
            raise OptionError(
                f"Unknown option --{name}: {', '.join(files)} has no such setting.{hint} "
                "Check the spelling (--help lists the options)."
            )
        if id in INTERNAL_IDS:
            raise OptionError(f"--{name} cannot be changed from the command line; remove it.")
        elsewhere = _other_workflows_option(id, workflow)
        if elsewhere is not None:
            raise OptionError(
                f"--{name} is an option of {elsewhere}, not of {workflow.name}; remove it "
                f"(--help lists the options of {workflow.name})."
            )
        default = _default_of(file_config, id)
        if id in user_data:
            values[id] = raw if isinstance(raw, str) else str(raw)
        elif id in optional and (raw is None or (isinstance(raw, str) and raw.strip().lower() in ("null", "none"))):
            values[id] = None
        elif isinstance(default, (bool, int, float, list, dict)):
            values[id] = _typed(raw, default, name)
        else:  # text, null or a config expression by default: the value given, as text (null: None)
            _refuse_config_code(raw, name)
            text = raw if isinstance(raw, str) else _as_text(raw)
            values[id] = None if default is None and str(text).strip().lower() in ("null", "none") else text
    return values


def _as_text(value: Any) -> Any:
    """What ``fire`` made of a command-line value, back as the text typed (a number, or a list or dict as JSON);
    True (a ``--flag`` without a value) and None stay as they are."""
    if value is True or value is None:
        return value
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def guard_overrides(
    user_data: Iterable[str] | None = None,
    debug: Any = None,
    argv: Sequence[str] | None = None,
    limits: Mapping[str, Sequence[float | None]] | None = None,
    optional: Iterable[str] | None = None,
) -> None:
    """Check and pin the user's inputs of the running bundle config (see the module docstring).

    Args:
        user_data: ids whose values are user data, always taken verbatim (None: the config's ``user_data``).
        debug: keep Python's traceback for input errors (None: ``--debug``, else the config's ``debug``).
        argv: the command line (default ``sys.argv``); only read when it is a ``python -m monai.bundle`` command.
        limits: ``{id: [min, max]}`` of numeric options (None: unbounded); their values, given or default, must be
            numbers in that range (or null where the default is null). None: the config's ``option_limits``.
        optional: ids of numeric options that null turns off (``--referral#split_depth_mm null``). None: the
            config's ``optional_options``.

    Called without arguments (``"$guard_overrides()"``), the guard reads its tables from the config file content,
    so that no setting is resolved, and no command-line value evaluated, before it has run.
    """
    options = command_line_options(argv)
    files = _config_files(options.get("config_file", [])) if options is not None else []
    if options is not None and options.get("help"):
        answer_help(files, argv)
    if options is not None:
        install_error_hook(False)
    parser = running_parser()
    if debug is None:
        debug = options["debug"] if options is not None and "debug" in options else parser.get("debug", False)
    debug = as_bool(debug, "debug")
    if options is not None:
        install_error_hook(debug)
    user_data = [ReferenceResolver.normalize_id(i) for i in _table(parser, "user_data", user_data, [])]
    limits = _table(parser, "option_limits", limits, {})
    optional = {ReferenceResolver.normalize_id(i) for i in _table(parser, "optional_options", optional, [])}
    # without config files on the command line (Python API, --args_file) MONAI has read the values: pin those
    values = _command_line_values(options, files, user_data, optional, workflow_of(files)) if files else {}
    for id in user_data:
        if id in parser and id not in values:
            values[id] = _user_value(parser, id, values, user_data)
    for id, (low, high) in ((ReferenceResolver.normalize_id(k), v) for k, v in limits.items()):
        if id in parser:
            values[id] = _within(values.get(id, parser[id]), low, high, id.replace("::", "#"))
    pin_values(parser, values)


def _table(parser: ConfigParser, id: str, given: Any, empty: Any) -> Any:
    """``given``, or else the guard's table ``id`` as the config files write it (never resolved)."""
    return given if given is not None else parser.get(id, empty)


def answer_help(files: Sequence[str], argv: Sequence[str] | None = None) -> None:
    """Print the options of the workflow that ``files`` run (:mod:`custom.options`) and end the process (status 0).

    The workflow is the one whose own config file is among ``files``, else the one whose run id the command names.
    """
    argv = list(sys.argv if argv is None else argv)
    run_id = argv[2] if len(argv) > 2 and not argv[2].startswith("-") else "run"
    workflow = workflow_of(files) or next((w for w in WORKFLOWS if w.run_id == run_id), None)
    given = ",".join(f"'{f}'" for f in files)
    command = f"python -m monai.bundle run {run_id} --config_file " + (files[0] if len(files) == 1 else f'"[{given}]"')
    sys.stdout.flush()
    if workflow is None:
        print(f"{command}: no options table for these config files (inference.json, evaluate.json and train.json "
              "have one); the settings are those of the config files.")  # fmt: skip
    else:
        sys.stdout.write(help_text(workflow, merged_config(files), command))
    sys.stdout.flush()
    raise SystemExit(0)


def _user_value(parser: ConfigParser, id: str, given: Mapping[str, Any], user_data: Sequence[str]) -> Any:
    """The value of user-data ``id`` that was not given: its config-file value, or, where the config file makes it a
    plain reference to another user-data id (``"prompt": "@displayable_configs#prompt"``, as model-zoo bundles
    expose options to MONAI Label), that id's value, given or not. Only the config file's own references are
    followed; a user's value is never read as one. A value pinned already stays as it is."""
    seen = {id}
    value = _config_value(parser, id)
    while isinstance(value, str) and value.startswith(ReferenceResolver.ref):
        target = ReferenceResolver.normalize_id(value[len(ReferenceResolver.ref) :])
        if target not in user_data or target in seen or target not in parser:
            break
        seen.add(target)
        if target in given:
            return given[target]
        value = _config_value(parser, target)
    return value


def _config_value(parser: ConfigParser, id: str) -> Any:
    """The config content of ``id``, or the value it was pinned to."""
    pinned, value = _pinned_value(parser[id])
    return value if pinned else parser[id]


def _within(value: Any, low: float | None, high: float | None, name: str) -> Any:
    """``value`` as a number in [low, high] (None or "null" stays None); else :class:`OptionError`."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none")):
        return None
    whole = isinstance(low, int) and not isinstance(low, bool)
    if isinstance(value, str) and value.startswith(("$", "@")):
        return value  # a config file's own expression (command-line values were refused above)
    number = _typed(value, 0 if whole else 0.0, name)
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f"from {low} to {high}" if low is not None and high is not None else f"at least {low}"
        if low is None:
            bounds = f"at most {high}"
        raise OptionError(f"--{name} must be {bounds}, got {value!r}. Pass a value in that range.")
    return number


def check_choice(value: Any, choices: Sequence[str], name: str) -> str:
    """``value`` when it is one of ``choices``; else :class:`OptionError` naming them."""
    if value not in choices:
        raise OptionError(
            f"--{name} must be one of {', '.join(choices)}, got {value!r}. Pass e.g. --{name} {choices[0]}."
        )
    return value


def check_device(device: Any) -> Any:
    """Return ``device`` if this machine has it; a CUDA device on a machine without CUDA is refused clearly."""
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise OptionError(f"--device {device!r} is not a device name. Pass --device cpu or --device cuda:0.") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {device} asks for a GPU, but this machine has no CUDA GPU. Pass --device cpu.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise OptionError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s). Pass --device cuda:0."
        )
    return device


class UserDataWorkflow(ConfigWorkflow):
    """A ``ConfigWorkflow`` whose user data never enters MONAI's config parser as config text.

    ``data`` (e.g. ``{"image": path, "prompt": text}``) is set as pinned values (:func:`pin`) before the config is
    parsed, so no character of it is read as an expression, reference or macro, not even ``$import``. Other keyword
    arguments are ordinary overrides (trusted settings such as ``output_dir``).
    """

    def __init__(self, config_file, data: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config_file=config_file, **kwargs)
        self.data = dict(data or {})
        unknown = [k for k in self.data if k not in self.parser]
        if unknown:
            raise OptionError(f"Unknown input(s) {unknown}: {config_file} has no such setting.")

    def initialize(self) -> Any:
        for id, value in self.data.items():
            self.parser[id] = _as_literal(value)
        return super().initialize()


# ----------------------------------------------------------------------------------------------- error output
def install_error_hook(debug: bool = False) -> None:
    """Print an :class:`InputError` (anywhere in an exception's chain) as ``error: <message>``, nothing after it.

    Other exceptions, and every exception with ``debug``, keep Python's full traceback.
    """
    previous = sys.excepthook
    if getattr(previous, "_lsms_input_errors", False):
        previous = previous.previous

    def hook(kind, error, tb):
        found = None if debug else find_input_error(error)
        if found is None:
            previous(kind, error, tb)
            return
        sys.stdout.flush()
        print(format_input_error(found), file=sys.stderr, flush=True)

    hook._lsms_input_errors = True
    hook.previous = previous
    sys.excepthook = hook


def format_input_error(error: BaseException) -> str:
    """What the error hook prints for ``error``: the message, its last line ``error: <problem>. <fix>``.

    A message of several lines (e.g. a list of skipped files) keeps its detail lines above that last line.
    Any other error gives its traceback.
    """
    found = find_input_error(error)
    if found is None:
        return "".join(traceback.format_exception(error))
    lines = [line for line in str(found).splitlines() if line.strip()] or [type(found).__name__]
    if len(lines) == 1:
        return f"error: {lines[0]}"
    summary, fix = lines[0].rstrip(":"), lines[-1].strip()
    last = f"{summary}. {fix}" if not fix.startswith("-") else f"{summary} (listed above)."
    return "\n".join(lines[1:] + [f"error: {last}"])
