"""The model card, ``bundle/docs/README.md``, as a bundle user reads it: short, and every command of its code blocks
runs from inside the packaged bundle (the folder ``python -m custom.package`` writes, see ``test_packaged_bundle``).

Each command of a code block (every block but ``json`` ones) is checked in two steps, in the card's order:

1. In this process: a ``python -m monai.bundle run <id>`` command (or ``torchrun ... -m monai.bundle run <id>``)
   names config files that the packaged bundle holds, whose merged config defines ``<id>`` and resolves every ``@``
   reference, and whose options pass the bundle's own option check (:mod:`custom.user_inputs`: unknown options,
   values of the wrong type or out of ``option_limits``, config code); a ``python -m custom.<module>`` command names
   a module the bundle ships. Any other command, and any placeholder not in :data:`PLACEHOLDERS`, fails the test:
   the card holds no command that this test does not check.
2. From the packaged bundle's folder, with the placeholders replaced and the overrides of :data:`CHEAP` (replacing
   the card's value of the same option, if any) so that it is cheap: the command must exit 0. ``torchrun`` commands
   stop after step 1 (:data:`STATIC_ONLY`): two training processes would cost minutes, and ``test_bundle`` runs
   DDP training and evaluation from the repository.
"""

from __future__ import annotations

import ast
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import monai
import pytest
import test_packaged_bundle as packaging_tests
from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver

from custom.user_inputs import _command_line_values, _within, command_line_options

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "bundle" / "docs" / "README.md"
MAX_LINES = 300

#: The packaged bundle (a fresh one for this module) and how ``test_packaged_bundle`` runs commands inside it.
packaged = packaging_tests.packaged
run_inside = packaging_tests.run_inside

#: Code blocks that hold data, not commands.
DATA_LANGUAGES = {"json"}
#: Placeholders of the card and what they stand for here: the shipped sample CT, a LiTS-layout folder of three
#: phantoms (``lits_folder`` of conftest) and a new folder (the converted dataset).
PLACEHOLDERS = ("/path/to/ct.nii.gz", "/path/to/Task03_Liver", "/path/to/dataset")
#: Overrides per (module, run id) that make a command cheap; "<small_dataset>" is the 6-case synthetic dataset of
#: conftest (instead of generating the default 96 cases and the 192 extra training cases).
CHEAP = {
    ("monai.bundle", "training"): {
        "dataset_dir": "<small_dataset>",
        "epochs": "1",
        "val_interval": "1",
        "in_plane_spacing": "4.0",
        "slice_size": "[96, 96]",
        "batch_cases": "2",
        "slices_per_expression": "2",
        "max_val_expressions": "2",
        "num_workers": "0",
    },
    ("monai.bundle", "evaluating"): {"dataset_dir": "<small_dataset>", "max_expressions": "2", "num_workers": "0"},
    ("custom.fine_tune", None): {
        "epochs": "1",
        "referral_epochs": "1",
        "replay_cases": "0",
        "batch_cases": "2",
        "slices_per_expression": "2",
        "max_val_expressions": "2",
    },
}
#: Launchers whose commands are only checked in this process (see the module docstring).
STATIC_ONLY = ("torchrun",)
#: Where ``python -m monai.bundle`` runs from: the bundle's option reader only reads a command line started there.
MONAI_BUNDLE_MAIN = str(Path(monai.__file__).parent / "bundle" / "__main__.py")


@dataclass
class Command:
    text: str  #: as written in the card
    argv: list[str] = field(default_factory=list)  #: after placeholders and cheap overrides
    launcher: str = ""  #: "python" or "torchrun"
    module: str = ""  #: "monai.bundle" or "custom...."
    run_id: str | None = None  #: the workflow of a monai.bundle command


def code_commands(text: str) -> list[str]:
    """The commands of the code blocks of a Markdown ``text`` (continuation lines joined, comments left out)."""
    commands, block, language = [], None, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            if block is None:
                block, language = [], line.strip()[3:].strip().lower()
            else:
                if language not in DATA_LANGUAGES:
                    joined = "\n".join(block).replace("\\\n", " ")
                    commands += [c.strip() for c in joined.splitlines() if c.strip() and not c.strip().startswith("#")]
                block = None
        elif block is not None:
            block.append(line)
    assert block is None, "the card has a code block that is never closed"
    return commands


def parse(text: str) -> tuple[Command, list[str]]:
    """The command of ``text`` and the problems that stop it before anything runs."""
    command = Command(text)
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as err:
        return command, [f"cannot be split into arguments: {err}"]
    if tokens[:2] == ["python", "-m"] and len(tokens) > 2:
        command.launcher, command.module, rest = "python", tokens[2], tokens[3:]
    elif tokens and tokens[0] == "torchrun" and "-m" in tokens and tokens.index("-m") + 1 < len(tokens):
        start = tokens.index("-m")
        command.launcher, command.module, rest = "torchrun", tokens[start + 1], tokens[start + 2 :]
    else:
        return command, ["is neither `python -m monai.bundle`, `python -m custom...` nor `torchrun -m monai.bundle`"]
    if command.module == "monai.bundle":
        if len(rest) < 2 or rest[0] != "run" or rest[1].startswith("-"):
            return command, ["is a monai.bundle command other than `run <workflow>`"]
        command.run_id = rest[1]
    elif not command.module.startswith("custom.") or command.launcher != "python":
        return command, [f"runs module {command.module}, which is neither monai.bundle nor the bundle's custom code"]
    command.argv = [command.launcher, "-m", command.module, *rest]
    return command, []


def with_values(command: Command, replacements: dict[str, str], datasets: dict[str, str]) -> list[str]:
    """Placeholders of ``command`` replaced; problems for placeholders that are not known."""
    problems, argv = [], []
    for token in command.argv:
        for placeholder in sorted(PLACEHOLDERS, key=len, reverse=True):
            if token.startswith(placeholder):
                token = replacements[placeholder] + token[len(placeholder) :]
                break
        if "/path/to/" in token or "<" in token or ">" in token:
            problems.append(f"has {token!r}, a placeholder this test does not know (PLACEHOLDERS) or a redirection")
        argv.append(token)
    overrides = CHEAP.get((command.module, command.run_id), {})
    kept, skip = [], False
    for token in argv:
        name = token[2:].partition("=")[0] if token.startswith("--") else None
        if skip:
            skip = False
        elif name in overrides:
            skip = "=" not in token
        else:
            kept.append(token)
    for name, value in overrides.items():
        kept += [f"--{name}", datasets.get(value, value)]
    command.argv = kept
    return problems


def config_problems(bundle: Path, command: Command) -> list[str]:
    """Step 1 for a monai.bundle command: its configs exist, merge, resolve, define the workflow, take its options."""
    options = command_line_options([MONAI_BUNDLE_MAIN, *command.argv[command.argv.index("monai.bundle") + 1 :]])
    given = options.get("config_file")
    if not isinstance(given, str):
        return ["gives no --config_file"]
    names = ast.literal_eval(given) if given.strip().startswith("[") else [given]
    files = [bundle / name for name in names]
    missing = [name for name, path in zip(names, files) if not path.is_file()]
    if missing:
        return [f"names {', '.join(missing)}, which the packaged bundle does not hold"]
    parser = ConfigParser()
    try:
        parser.read_config([str(f) for f in files])
        parser.parse()
    except Exception as err:  # configs that do not merge, a macro (%) naming a missing file or key
        return [f"has configs that do not merge and parse: {err!r}"]
    problems = []
    if command.run_id not in parser:
        problems.append(f"runs workflow {command.run_id!r}, which {', '.join(names)} does not define")
    unresolved = sorted(r for r in ReferenceResolver.find_refs_in_config(parser.get(), id="") if r not in parser)
    if unresolved:
        problems.append(f"has configs referring to ids they do not define: {', '.join(unresolved)}")
    try:
        values = _command_line_values(
            options, [str(f) for f in files], parser.get("user_data", []), parser.get("optional_options", [])
        )
        for name, (low, high) in parser.get("option_limits", {}).items():
            id = ReferenceResolver.normalize_id(name)
            if id in values:
                _within(values[id], low, high, name)
    except Exception as err:  # the bundle's own refusal (custom.user_inputs.OptionError)
        problems.append(f"is refused by the bundle's option check: {err}")
    return problems


def static_problems(bundle: Path, command: Command) -> list[str]:
    """Step 1: what stops ``command`` from running in ``bundle``, found without running it."""
    if command.module == "monai.bundle":
        return config_problems(bundle, command)
    module = bundle.joinpath(*command.module.split("."))
    if not (module.with_suffix(".py").is_file() or (module / "__main__.py").is_file()):
        return [f"runs {command.module}, which the packaged bundle does not ship"]
    return []


def checked(text: str, bundle: Path, replacements: dict[str, str], datasets: dict[str, str]) -> list[Command]:
    """The commands of a card ``text``, ready to run; AssertionError listing every command that fails step 1."""
    commands, problems = [], []
    for line in code_commands(text):
        command, found = parse(line)
        if not found:
            found = with_values(command, replacements, datasets)
        if not found:
            found = static_problems(bundle, command)
        problems += [f"`{line}` {problem}" for problem in found]
        commands.append(command)
    assert not problems, "\n".join(problems)
    return commands


@pytest.fixture()
def values(packaged, small_dataset, lits_folder, tmp_path) -> tuple[dict[str, str], dict[str, str]]:
    """(placeholder replacements, dataset names of CHEAP) for commands run inside ``packaged``."""
    replacements = {
        "/path/to/ct.nii.gz": "sample/sample_case.nii.gz",
        "/path/to/Task03_Liver": str(lits_folder[0]),
        "/path/to/dataset": str(tmp_path / "dataset"),
    }
    return replacements, {"<small_dataset>": str(Path(small_dataset).parent)}


def test_the_card_is_short():
    lines = len(CARD.read_text().splitlines())
    assert lines < MAX_LINES, f"{CARD} has {lines} lines; the model card stays under {MAX_LINES}"


def test_every_command_of_the_card_runs_in_the_packaged_bundle(packaged, values):
    commands = checked(CARD.read_text(), packaged, *values)
    assert {c.run_id for c in commands} >= {"inference", "training", "evaluating"}, "the card lost a main command"
    failed = []
    for command in commands:
        if command.launcher in STATIC_ONLY:
            continue
        done = run_inside(packaged, *command.argv[1:])
        if done.returncode != 0:
            failed.append(
                f"`{command.text}` ran as {command.argv} and exited {done.returncode}:\n{done.stderr[-1500:]}"
            )
    assert not failed, "\n\n".join(failed)


BROKEN = {
    "config name": "python -m monai.bundle run inference --config_file configs/inferenc.json",
    "config list": "torchrun -m monai.bundle run training --config_file \"['configs/train.json','configs/ddp.json']\"",
    "workflow": "python -m monai.bundle run infer --config_file configs/inference.json",
    "option": 'python -m monai.bundle run inference --config_file configs/inference.json --promt "a lesion"',
    "option type": "python -m monai.bundle run training --config_file configs/train.json --resume maybe",
    "option range": "python -m monai.bundle run inference --config_file configs/inference.json --in_plane_spacing -2",
    "module": "python -m custom.exprot --config_file configs/inference.json",
    "placeholder": "python -m monai.bundle run inference --config_file configs/inference.json --image <your CT>",
    "other command": "pip install -r requirements.txt",
}


@pytest.mark.parametrize("line", list(BROKEN.values()), ids=list(BROKEN))
def test_a_card_command_that_cannot_run_fails_the_check(line, packaged, values):
    with pytest.raises(AssertionError, match="`"):
        checked(f"```bash\n{line}\n```\n", packaged, *values)
