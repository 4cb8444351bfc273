"""The options of the bundle's workflows: what each one means, said here once, and the tables users read.

A user sets an option on the command line, ``python -m monai.bundle run inference --config_file
bundle/configs/inference.json --<option> <value>`` (nested settings with ``#``: ``--referral#threshold 0.4``). The
default of an option is its value in the workflow's config files and is never restated here; :data:`OPTIONS` says
what each option means and for which workflows (an option that means something else in another workflow is listed
once per meaning). From it come

- the answer to ``--help``: :func:`custom.user_inputs.guard_overrides` prints the table of the workflow being run,
  with the defaults of the config files given, and ends the process (status 0) before any data, weights or
  network is loaded;
- ``bundle/docs/options.md``, the tables of the three workflows: ``python -m custom.options --write
  bundle/docs/options.md`` (``--check`` compares; without either, the tables are printed).

``tests/test_options.py`` checks the tables against the configs: every setting a user can give a value to is
described, and every described option is a setting of its workflow's config files.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

__all__ = [
    "EVALUATION",
    "INFERENCE",
    "INTERNAL_IDS",
    "OPTIONS",
    "TRAINING",
    "WORKFLOWS",
    "Option",
    "Workflow",
    "config_dir",
    "document",
    "help_text",
    "markdown_table",
    "merged_config",
    "options_of",
    "rows",
    "settable_ids",
    "workflow_of",
]


@dataclass(frozen=True)
class Workflow:
    """A workflow of the bundle: its name, the run id of its command and its config files, merged in this order."""

    name: str
    run_id: str
    files: tuple[str, ...]

    def command(self, configs: str = "bundle/configs") -> str:
        """The command that runs it, with the config files under ``configs``."""
        paths = [f"{configs}/{name}" for name in self.files]
        files = paths[0] if len(paths) == 1 else '"[' + ",".join(f"'{p}'" for p in paths) + ']"'
        return f"python -m monai.bundle run {self.run_id} --config_file {files}"


INFERENCE = Workflow("inference", "inference", ("inference.json",))
EVALUATION = Workflow("evaluation", "evaluating", ("inference.json", "evaluate.json"))
TRAINING = Workflow("training", "training", ("train.json",))
WORKFLOWS = (INFERENCE, EVALUATION, TRAINING)

#: Config ids that hold the workflow itself, not settings: its steps and the tables of the option checks.
INTERNAL_IDS = frozenset(
    {"_meta_", "imports", "require_bundle_code", "initialize", "run", "finalize", "inference", "evaluating",
     "training", "user_data", "option_limits", "optional_options", "liver_phase_info",
     "candidate_map_to_input_grid"}
)  # fmt: skip


@dataclass(frozen=True)
class Option:
    """A setting a user gives on the command line (``--id value``), what it means, and the workflows it is in."""

    id: str
    workflows: tuple[str, ...]
    meaning: str


INFER, EVAL, TRAIN = ("inference",), ("evaluation",), ("training",)
INFER_EVAL, EVAL_TRAIN, ALL = INFER + EVAL, EVAL + TRAIN, INFER + EVAL + TRAIN

#: Every option, in the order of the tables. Defaults are the configs' values (not repeated here).
OPTIONS: tuple[Option, ...] = (
    # what to read
    Option("image", INFER, "The CT to read: a NIfTI file (.nii, .nii.gz) or a folder holding a CT DICOM series. null: "
           "the shipped sample CT, with its own prompt. Give --prompt with it."),
    Option("prompt", INFER, "What to segment, in English (\"the largest hypodense lesion in the right lobe\"). Taken "
           "as the text given, never as config code; at most max_tokens tokens and 1,000 characters."),
    Option("displayable_configs#prompt", INFER, "The prompt as MONAI Label shows and sets it (prompt refers to it)."),
    Option("datalist", INFER, "A JSON list of {\"image\": ..., \"prompt\": ...} pairs, run instead of --image and "
           "--prompt."),
    Option("dataset_dir", INFER, "A folder whose NIfTI images (.nii, .nii.gz) are each run with --prompt."),
    Option("series_uid", INFER, "The SeriesInstanceUID to read when the --image folder holds several DICOM series."),
    Option("require_ct", INFER, "Refuse images that are not plausibly a CT in Hounsfield units; false forces these "
           "checks through."),
    Option("sample_image", INFER, "The CT read when none of --image, --datalist and --dataset_dir is given."),
    Option("dataset_dir", EVAL_TRAIN, "A dataset folder holding a referring datalist.json (training, validation and "
           "test splits). null: the default synthetic dataset, generated into --cache_dir on first use."),
    Option("datalist", EVAL_TRAIN, "The referring datalist file; by default datalist.json of --dataset_dir, or the "
           "default dataset's."),
    Option("cache_dir", EVAL_TRAIN, "Folder where generated datasets are written and kept (the default dataset, the "
           "extra training cases)."),
    Option("split", EVAL, "The split of the datalist to evaluate: training, validation or test."),
    Option("max_expressions", EVAL, "Evaluate the first N expressions only (null: all)."),
    Option("shuffle_text_seed", EVAL, "Give each expression the text of another one of its split, shuffled with this "
           "seed (null: its own text): a control for whether the text is used."),
    Option("withhold_text", EVAL, "Run without the expressions' text (the text-free answer): a control."),
    # training
    Option("run_dir", TRAIN, "Folder of this training run (logs/ and models/). A folder that holds a run already is "
           "refused unless --resume true."),
    Option("resume", TRAIN, "Continue the interrupted run of --run_dir from its last saved epoch."),
    Option("save_interval", TRAIN, "Epochs between saves of the full training state."),
    Option("seed", TRAIN, "Seed of the run; every epoch starts from seeds derived from it and the epoch."),
    Option("initial_weights", TRAIN, "A weights file loaded before the first step (null: a fresh start). A resumed "
           "run takes its own state instead."),
    Option("max_train_cases", TRAIN, "Train on the first N training cases of the datalist only (null: all)."),
    Option("extra_cases", TRAIN, "Cases generated with another seed and added to the training split (with the default "
           "dataset only, never with --dataset_dir)."),
    Option("replay_cases", TRAIN, "Cases of the generated phantom added to the training split of a --dataset_dir, so "
           "that fine-tuning on a few real cases keeps what the phantom taught (0: none)."),
    Option("dataset_cache", TRAIN, "How preprocessed training cases are kept: memory (every case held in memory; the "
           "default for the generated dataset) or disk (each case's liver-centred crop written once under "
           "crop_cache_dir and read back when drawn, so memory stays flat as cases are added; the default with "
           "--dataset_dir)."),
    Option("crop_cache_dir", TRAIN, "Folder of the disk cache of training crops (default: in the run folder), one "
           "subfolder per preprocessing setting; a case whose files change is cropped again."),
    Option("hard_cases", TRAIN, "Cases generated with seed 2 and hard_case_options (more small and hyperdense "
           "lesions) added to the training split (default dataset only)."),
    Option("hard_case_options#kind_weights", TRAIN, "Shares of cysts, metastases and hyperdense lesions in the hard "
           "cases."),
    Option("hard_case_options#diameter_range#cyst", TRAIN, "Diameters (mm) of the cysts of the hard cases."),
    Option("hard_case_options#diameter_range#metastasis", TRAIN, "Diameters (mm) of the metastases of the hard cases."),
    Option("hard_case_options#diameter_range#hyperdense", TRAIN, "Diameters (mm) of the hyperdense lesions of the "
           "hard cases."),
    Option("lesion_slices", TRAIN, "Each step also takes one slice of every lesion of the case, referred or not."),
    Option("max_val_expressions", TRAIN, "Validate on the first N expressions only (null: all)."),
    Option("epochs", TRAIN, "Training epochs."),
    Option("val_interval", TRAIN, "Epochs between validations; the best model is chosen on them."),
    Option("learning_rate", TRAIN, "Starting learning rate of AdamW (cosine schedule)."),
    Option("batch_cases", TRAIN, "Cases per step."),
    Option("slices_per_expression", TRAIN, "Slices per case and step, at most."),
    Option("negative_ratio", TRAIN, "Liver slices without the referred target taken per slice with it."),
    Option("text_free_prob", TRAIN, "Share of the samples made text-free (their target: every lesion); 3-channel "
           "networks only."),
    Option("dense_weight", TRAIN, "Weight of the loss on the text-free liver and all-lesion channels."),
    Option("small_lesion_weight", TRAIN, "Weight of the cross-entropy on the all-lesion channel in which small "
           "lesions weigh more per pixel (0: off)."),
    Option("foreground_prior", TRAIN, "Foreground probability the output bias starts at (null: left as built)."),
    Option("slice_size", TRAIN, "Size [x, y] in voxels of the liver-centred training crops (192x128 at 1.5 mm: 288 x "
           "192 mm)."),
    Option("augment", TRAIN, "The scanner augmentations (contrast phase, HU offset, smoothing, sharpening, noise, "
           "thinner slices); false turns them off."),
    Option("scanner_augmentation#phase_prob", TRAIN, "Probability of another contrast phase (liver and vessel HU)."),
    Option("scanner_augmentation#liver_hu_range", TRAIN, "Liver HU range of the contrast phases."),
    Option("scanner_augmentation#vessel_offset_range", TRAIN, "Vessel HU relative to the liver in the contrast "
           "phases."),
    Option("scanner_augmentation#offset_prob", TRAIN, "Probability of an HU offset of the whole image."),
    Option("scanner_augmentation#offset_hu", TRAIN, "Largest HU offset."),
    Option("scanner_augmentation#noise_prob", TRAIN, "Probability of Gaussian noise."),
    Option("scanner_augmentation#noise_std_hu", TRAIN, "Largest standard deviation (HU) of the noise."),
    Option("scanner_augmentation#smooth_prob", TRAIN, "Probability of a smoothing kernel."),
    Option("scanner_augmentation#smooth_sigma", TRAIN, "Range of its sigma (voxels)."),
    Option("scanner_augmentation#sharpen_prob", TRAIN, "Probability of a sharpening kernel."),
    Option("scanner_augmentation#sharpen_amount", TRAIN, "Range of its strength."),
    Option("scanner_augmentation#thin_slices_prob", TRAIN, "Probability of thinner slices (zoom along z)."),
    Option("scanner_augmentation#thin_slices_max_zoom", TRAIN, "Largest zoom along z."),
    # what to write
    Option("output_dir", INFER, "Folder of the outputs: a folder per input holding, per prompt, the mask "
           "(.nii.gz; a DICOM-SEG .dcm for a DICOM series), the record (.json) and an overlay (.png)."),
    Option("output_dir", EVAL, "Folder of the results: a table per expression (.csv) and a summary (.json)."),
    Option("output_dir", TRAIN, "Folder of the TensorBoard logs."),
    Option("results_prefix", EVAL, "Name prefix of the results files (its _expressions.csv and _summary.json); by "
           "default the split."),
    Option("overwrite", INFER, "Replace the outputs of an earlier run; false: an existing output is refused."),
    Option("montage", INFER, "Also write a montage (.png) of the slices of the answer."),
    Option("candidate_map", INFER, "Also write every lesion candidate as a label map (_candidates.nii.gz), numbered "
           "as the record's referral.candidates (MONAI Label returns it as segments)."),
    # weights
    Option("bundle_root", ALL, "The bundle folder (configs/, models/, sample/), relative to the working folder."),
    Option("ckpt_dir", INFER_EVAL, "Folder of the shipped weights."),
    Option("ckpt_dir", TRAIN, "Folder of the run's weights and training state."),
    Option("checkpoint", INFER_EVAL, "The network's weights file."),
    Option("referral_scorer_path", INFER_EVAL, "The referral scorer's weights file (for --referral#method scorer)."),
    # running
    Option("device", ALL, "Where the network runs: cpu, cuda or cuda:N; by default the first GPU if there is one."),
    Option("num_workers", EVAL_TRAIN, "Processes that load the data (0: the main process)."),
    Option("progress", EVAL_TRAIN, "Show a progress bar."),
    Option("debug", ALL, "Print Python's traceback for input errors too, instead of one error line."),
    Option("report_answers", INFER_EVAL, "Log a line per answered prompt and a last line naming the files written "
           "(off in evaluation, which writes tables)."),
    Option("keep_freed_memory", INFER_EVAL, "Let the C allocator keep freed memory for reuse (faster); false gives it "
           "back to the system."),
    Option("skip_exit_collection", INFER_EVAL, "Skip the garbage collection of the objects still alive at exit (about "
           "0.9 s of every process)."),
    # the network's input and output: as the weights were trained
    Option("in_plane_spacing", ALL, "In-plane voxel size (mm) the CT is resampled to (slices as loaded); the weights "
           "were trained at 1.5 mm."),
    Option("windows", ALL, "HU windows [level, width], one input channel each; as the weights were trained."),
    Option("context_slices", ALL, "Neighbouring slices on either side given to the network as extra channels; as the "
           "weights were trained."),
    Option("detail_channels", ALL, "Channels of the optional stride-2 detail head (0: none); as the weights were "
           "trained."),
    Option("out_channels", ALL, "Network outputs: 3 (referred lesions, liver, all lesions; the shipped weights) or 1 "
           "(referred lesions); as the weights were trained."),
    Option("text_model_path", ALL, "A local Hugging Face BERT folder for the text encoder (null: the bundled "
           "MiniLM-L6, or $LSMS_TEXT_MODEL)."),
    Option("max_tokens", ALL, "Tokens of an expression, special tokens included; a longer prompt is refused."),
    # the liver
    Option("liver_region#threshold", ALL, "Probability at which the text-free liver output counts as liver."),
    Option("liver_region#margin_mm", ALL, "Margin (mm) around the liver's box that the referring pass reads."),
    Option("liver_region#answer_margin_mm", ALL, "Answers are kept within this distance (mm) of the liver."),
    Option("liver_region#coarse_factor", ALL, "In-plane pooling of the coarse pass that locates the liver first; "
           "null: one level (the text-free pass on whole slices)."),
    Option("liver_region#coarse_step_mm", ALL, "Distance (mm) between the slices of the coarse pass."),
    Option("liver_region#coarse_margin_mm", ALL, "Slack (mm) around the liver the coarse pass found."),
    Option("liver_region#scope_image_key", INFER_EVAL, "The image the scope check reads (no liver in view: no "
           "answer); null turns the check off."),
    # what scanners do, undone before the network reads the CT (custom/harmonisation.py)
    Option("harmonisation#enabled", INFER_EVAL, "Measure the CT against what the network learned and correct HU "
           "offsets, strong noise, thin slices and a liver outside the learned HU; false: read the CT as stored."),
    Option("harmonisation#fat_reference_hu", INFER_EVAL, "HU of fat in the CT the network learned."),
    Option("harmonisation#offset_tolerance_hu", INFER_EVAL, "A fat peak further than this from the reference is "
           "an HU offset, removed."),
    Option("harmonisation#noise_limit_hu", INFER_EVAL, "Noise (robust SD in fat, HU) above which the CT is "
           "smoothed in plane."),
    Option("harmonisation#noise_target_hu", INFER_EVAL, "Noise the smoothing brings it down to."),
    Option("harmonisation#min_slice_mm", INFER_EVAL, "Slices closer than this are averaged into slabs."),
    Option("harmonisation#slice_mm", INFER_EVAL, "Thickness of those slabs (mm)."),
    Option("harmonisation#liver_phase", INFER_EVAL, "After a first pass, move a liver outside liver_hu_range with "
           "its lesions to liver_hu_target and read it again (off: on real unenhanced CT it found fewer lesions)."),
    Option("harmonisation#liver_hu_range", INFER_EVAL, "[low, high] HU of the livers the network learned; a liver "
           "outside is moved, with its lesions, to liver_hu_target (with liver_phase)."),
    Option("harmonisation#liver_hu_target", INFER_EVAL, "HU the liver's median is moved to."),
    # the referral
    Option("referral#method", INFER_EVAL, "scorer: the learned candidate-level referral; rule: the earlier rule on "
           "the referring output."),
    Option("referral#read_sentence", INFER_EVAL, "Read the sentence and answer it on the candidates' measured "
           "attributes where it reads fully; false: the scorer alone."),
    Option("referral#candidate_threshold", INFER_EVAL, "All-lesion probability at which the text-free output forms "
           "the lesion candidates."),
    Option("referral#split_depth_mm", INFER_EVAL, "Depth (mm) of a narrowing at which a candidate of touching lesions "
           "is split; null keeps whole components."),
    Option("referral#min_voxels", ALL, "Smallest candidate or answer component, in voxels."),
    Option("referral#threshold", ALL, "Probability at which a voxel of the referring output counts: the rule's mask "
           "(--referral#method rule, training's validation) and the evidence the scorer reads."),
    Option("referral#relative_evidence", ALL, "The rule keeps the components whose mean probability is at least this "
           "share of the strongest one's."),
    Option("referral#none_threshold", INFER_EVAL, "The scorer answers \"not present\"when its none-of-them "
           "probability reaches this."),
    Option("referral#select_threshold", INFER_EVAL, "The scorer chooses the candidates whose probability reaches "
           "this."),
    Option("referral#lesion#score", INFER_EVAL, "A candidate is set aside as no real lesion when its scorer "
           "probability is below this and its mean evidence below referral#lesion#evidence."),
    Option("referral#lesion#evidence", INFER_EVAL, "See referral#lesion#score."),
    Option("referral#lesion#detection", INFER_EVAL, "A candidate whose mean all-lesion probability is below this is "
           "set aside."),
    Option("referral#query#location_mm", INFER_EVAL, "Margin (mm) within which a candidate is too close to call for a "
           "place in the sentence (lobe, segment, ...)."),
    Option("referral#query#density_hu", INFER_EVAL, "Margin (HU) within which a candidate is too close to call for "
           "hypodense or hyperdense."),
    Option("referral#query#kind_hu", INFER_EVAL, "Margin (HU) around referral#query#cyst_max_hu within which a "
           "candidate is too close to call for cyst or solid."),
    Option("referral#query#cyst_max_hu", INFER_EVAL, "Highest mean HU of a cyst; above it a lesion is solid."),
    Option("referral#query#open_support", INFER_EVAL, "Support (scorer probability plus mean evidence, 0 to 2) a "
           "candidate too close to call needs to be taken when none passes a filter clearly."),
    Option("referral#query#near_ties", INFER_EVAL, "scorer: in a superlative (\"the largest\"), the candidates the "
           "measurement cannot tell apart are all chosen when the scorer picks two or more of them; off: the measured "
           "winner."),
    Option("referral#out_of_scope_confidence", INFER_EVAL, "Confidence of \"not present\"for a sentence about another "
           "organ."),
    Option("referral#confidence_calibration#found", INFER_EVAL, "Coefficients of the confidence of a found answer "
           "(python -m custom.clinical.calibrate --confidence fits them)."),
    Option("referral#confidence_calibration#not_present", INFER_EVAL, "Coefficients of the confidence of \"not "
           "present\"."),
    Option("referral#confidence_calibration#min_evidence", INFER_EVAL, "A found answer whose mean evidence is below "
           "this gets a confidence under 0.5."),
    Option("not_present_rule#min_max_probability", ALL, "The rule answers \"found\"only with a voxel probability of "
           "at least this (python -m custom.clinical.calibrate fits it)."),
    Option("not_present_rule#min_volume_ml", ALL, "... and a volume (ml) of at least this."),
    Option("not_present_rule#voxel_threshold", ALL, "Probability at which a voxel belongs to the rule's mask and "
           "volume."),
)  # fmt: skip


# ----------------------------------------------------------------------------------------------- configs
#: The repository, or the packaged bundle folder (:mod:`custom.package`).
ROOT = Path(__file__).resolve().parents[1]


def config_dir() -> Path:
    """The folder of the bundle's configs: ``bundle/configs`` in the repository, ``configs`` in a packaged bundle."""
    return ROOT / "bundle" / "configs" if (ROOT / "bundle" / "configs").is_dir() else ROOT / "configs"


def merged_config(files: Sequence[str | Path]) -> dict:
    """The content of ``files`` merged as MONAI merges a list of config files (nested ids and ``+`` keys in place)."""
    return ConfigParser.load_config_files([str(f) for f in files])


def workflow_of(files: Sequence[str | Path]) -> Workflow | None:
    """The workflow that ``files`` run: that of the last of them named as a workflow's own config (None: none is)."""
    own = {workflow.files[-1]: workflow for workflow in WORKFLOWS}
    found = [own[Path(f).name] for f in files if Path(f).name in own]
    return found[-1] if found else None


def options_of(workflow: Workflow | str) -> list[Option]:
    """The options of ``workflow``, in the order of the tables."""
    name = workflow.name if isinstance(workflow, Workflow) else workflow
    return [option for option in OPTIONS if name in option.workflows]


def _node(config: Any, id: str) -> tuple[bool, Any]:
    for key in id.split("#"):
        if isinstance(config, dict) and key in config:
            config = config[key]
        elif isinstance(config, list) and key.isdigit() and int(key) < len(config):
            config = config[int(key)]
        else:
            return False, None
    return True, config


def _is_literal(value: Any) -> bool:
    """Whether ``value`` is data a user may replace: not a component, an expression or a reference."""
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, list):
        return all(_is_literal(v) and not isinstance(v, dict) for v in value)
    return not isinstance(value, dict)


def settable_ids(config: Mapping, prefix: str = "") -> Iterator[str]:
    """Ids of the settings of ``config`` that hold data (numbers, switches, text, lists of them, null): every
    top-level item and every item of a plain dict (no ``_target_``), but not the workflow's steps
    (:data:`INTERNAL_IDS`), components, expressions or references, nor anything inside a component."""
    for key, value in config.items():
        if not prefix and key in INTERNAL_IDS:
            continue
        if isinstance(value, dict) and "_target_" not in value:
            yield from settable_ids(value, f"{prefix}{key}#")
        elif _is_literal(value):
            yield f"{prefix}{key}"


# ----------------------------------------------------------------------------------------------- tables
def _default(value: Any) -> str:
    """A default as the config file writes it (JSON)."""
    return json.dumps(value)


def rows(workflow: Workflow, config: Mapping) -> list[tuple[str, str, str]]:
    """(``--option``, default, meaning) of each option of ``workflow`` that ``config`` holds."""
    found = []
    for option in options_of(workflow):
        present, value = _node(config, option.id)
        if present:
            found.append((f"--{option.id}", _default(value), option.meaning))
    return found


def help_text(workflow: Workflow, config: Mapping, command: str) -> str:
    """What ``--help`` prints: the command and the options of ``workflow``, defaults from ``config``."""
    lines = [f"{command} [--<option> <value> ...]", "", f"Options of {workflow.name} (default: the config's value):"]
    for name, default, meaning in rows(workflow, config):
        lines += ["", f"  {name} (default: {default})"]
        lines += textwrap.wrap(meaning, width=100, initial_indent="      ", subsequent_indent="      ")
    lines += ["", "Values are data: text is taken as given; $, @ and % (config code) are refused. The tables of "
              "every workflow: docs/options.md in the bundle folder."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(workflow: Workflow, config: Mapping) -> str:
    lines = ["| option | default | meaning |", "|---|---|---|"]
    lines += [
        f"| `{name}` | `{_cell(default)}` | {_cell(meaning)} |" for name, default, meaning in rows(workflow, config)
    ]
    return "\n".join(lines)


DOCUMENT_INTRO = """\
# Options

<!-- Written by python -m custom.options --write bundle/docs/options.md from custom/options.py (the meanings) and
the configs (the defaults). Do not edit by hand. -->

Each workflow takes its options on the command line as `--<option> <value>`; a nested setting is named with `#`
(`--referral#threshold 0.4`). `--help` prints the workflow's table. The default is the value in the config files:
`$...` is a config expression, `@...` a reference to another setting, `null` none. Values are data: text (a prompt,
a path) is taken as given, numbers and switches must have the type of their default (switches are `true`/`false`,
`yes`/`no`, `1`/`0`), the ranges of `option_limits` are checked, and a value that starts with `$`, `@` or `%`
(config code) is refused; expressions belong in a config file added to `--config_file`. An unknown option is refused
with the closest known one, and so is an option of another workflow (`--prompt` in evaluation).
"""


def document() -> str:
    """The text of ``bundle/docs/options.md``: one table per workflow, defaults from the bundle's configs."""
    configs = config_dir()
    shown = configs.relative_to(ROOT)
    parts = [DOCUMENT_INTRO]
    for workflow in WORKFLOWS:
        config = merged_config([configs / name for name in workflow.files])
        parts += [f"## {workflow.name.capitalize()}", "", f"`{workflow.command(shown.as_posix())}`", ""]
        parts += [markdown_table(workflow, config), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m custom.options", description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help="write the options document (bundle/docs/options.md)")
    parser.add_argument("--check", metavar="FILE", help="exit with status 1 unless FILE is the current document")
    args = parser.parse_args(argv)
    text = document()
    if args.write:
        Path(args.write).write_text(text)
    elif args.check:
        if Path(args.check).read_text() != text:
            print(f"error: {args.check} is not up to date. Run python -m custom.options --write {args.check}.")
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
