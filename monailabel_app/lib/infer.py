"""MONAI Label infer task that runs the bundle's own inference workflow with a free-text prompt.

Why not ``monailabel.tasks.infer.bundle.BundleInferTask``: it takes the bundle's ``preprocessing``, ``inferer`` and
``postprocessing`` apart and calls ``inferer(image, network)`` itself, so (1) the expression's tokens never reach
the network (our ``ReferringSliceInferer`` needs ``input_ids``/``attention_mask``), (2) the volume-level step and
the writers of the mask and the measurement record (run by the bundle's evaluator) are skipped, and (3) a prompt
edited in ``displayable_configs`` only reaches the tokenizer if the bundle refers to it in that direction. Running
the bundle's workflow (``initialize``/``run``/``finalize`` of ``configs/inference.json``) once per request gives
exactly what ``python -m monai.bundle run inference`` gives for the same image and prompt, with no pipeline logic
repeated here.

The weights are the bundle's own, or those of the trained version the app serves (``lib/versions.py``), looked up
for each request; the answer names them (``weights_version``: ``bundle`` or ``v<N>``).
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from fastapi import HTTPException
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.options import yes_no
from lib.prompt import PromptChecker, PromptError
from lib.versions import BUNDLE, VersionStore, Weights

logger = logging.getLogger(__name__)

#: Name of the single label of the returned mask in ``/info`` (value 1 in the mask).
LABEL_NAME = "referred lesion"

#: Longest segment name given to 3D Slicer (the prompt is cut beyond it).
MAX_SEGMENT_NAME = 64

#: The request option that asks for every lesion candidate as its own segment (shown in 3D Slicer as a checkbox).
CANDIDATES_OPTION = "candidates"

#: Per-candidate figures of the record copied into the answer's ``candidates``.
CANDIDATE_FIELDS = (
    "score", "volume_ml", "longest_axial_diameter_mm", "mean_hu", "density", "lobe", "segment", "why",
)  # fmt: skip


class InferenceInputError(Exception):
    """A request the bundle cannot run (unknown image, unreadable volume): answered with a 4xx status."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def _segment_name(prompt: str, found: Optional[bool]) -> str:
    name = " ".join(prompt.split())
    if len(name) > MAX_SEGMENT_NAME:
        name = name[: MAX_SEGMENT_NAME - 3].rstrip() + "..."
    return f"{name} (not present)" if found is False else name


def _yes(value: Any) -> bool:
    """A request's yes/no option (:func:`lib.options.yes_no`; an empty text is no)."""
    flag = yes_no(value) if value != "" else False
    if flag is not None:
        return flag
    raise InferenceInputError(422, f"'{CANDIDATES_OPTION}' must be true or false, got {value!r}.")


def candidate_segments(prompt: str, record: Dict[str, Any]) -> Tuple[Dict[str, int], list]:
    """Segment names (label value ``k`` = candidate ``k`` of the record's ``referral.candidates``) and each
    candidate's figures: the chosen ones named after the prompt, the others "candidate k (not chosen)"."""
    names: Dict[str, int] = {}
    details = []
    for candidate in (record.get("referral") or {}).get("candidates") or []:
        k = int(candidate["candidate"])
        chosen = bool(candidate.get("chosen")) and bool(record.get("found"))
        volume = candidate.get("volume_ml")
        size = f", {volume:.1f} ml" if isinstance(volume, (int, float)) else ""
        name = f"{_segment_name(prompt, True)} #{k}" if chosen else f"candidate {k} (not chosen{size})"
        names[name] = k
        details.append(
            {
                "label": k,
                "name": name,
                "chosen": chosen,
                **{f: candidate[f] for f in CANDIDATE_FIELDS if f in candidate},
            }
        )
    return names, details


def code_root_of(bundle_path: str) -> str:
    """The folder holding the bundle's Python components, the ``custom`` package: the bundle folder itself in a
    packaged bundle (python -m custom.package), else the folder above it (the repository)."""
    bundle_path = os.path.realpath(bundle_path)
    return bundle_path if os.path.isdir(os.path.join(bundle_path, "custom")) else os.path.dirname(bundle_path)


class LSMSReferringInfer(InferTask):
    """Referring lesion segmentation: the mask of the lesion(s) a free-text prompt refers to, and its record.

    Args:
        bundle_path: the bundle folder (``configs/inference.json``, ``configs/metadata.json``, ``models/``).
        config_file: name of the inference config inside ``<bundle_path>/configs``.
        conf: the app's ``--conf`` options (unused keys are ignored).
        store: the trained versions (``lib/versions.py``): each request is answered with the weights of the version
            served at that moment, else the bundle's own. None: always the bundle's.
    """

    def __init__(
        self,
        bundle_path: str,
        config_file: str = "inference.json",
        conf: Optional[Dict[str, str]] = None,
        store: Optional[VersionStore] = None,
    ):
        self.bundle_path = os.path.realpath(bundle_path)
        self.store = store
        self.config_path = os.path.join(self.bundle_path, "configs", config_file)
        self.meta_path = os.path.join(self.bundle_path, "configs", "metadata.json")
        self.conf = dict(conf or {})
        self.code_root = code_root_of(self.bundle_path)
        if self.code_root not in sys.path:
            sys.path.insert(0, self.code_root)

        self._valid = os.path.isfile(self.config_path)
        metadata: Dict[str, Any] = {}
        if os.path.isfile(self.meta_path):
            with open(self.meta_path) as f:
                metadata = json.load(f)
        self.version = metadata.get("version")

        displayable: Dict[str, Any] = {"prompt": ""}
        text_model_path = None
        max_tokens = None
        if self._valid:
            parser = ConfigParser()
            parser.read_config(self.config_path)
            if "displayable_configs" in parser:
                displayable = dict(parser.get_parsed_content("displayable_configs", instantiate=False))
            elif "prompt" in parser:
                displayable = {"prompt": parser.get_parsed_content("prompt")}
            self._top_level_ids = {k for k in displayable if k in parser}
            text_model_path = parser.get_parsed_content("text_model_path") if "text_model_path" in parser else None
            max_tokens = parser.get_parsed_content("max_tokens") if "max_tokens" in parser else None
        else:
            self._top_level_ids = {"prompt"}
            logger.warning(f"LSMS: no inference config at {self.config_path}; the model is not offered.")
        displayable.setdefault("prompt", "")
        displayable.setdefault(CANDIDATES_OPTION, True)
        self.displayable_configs = displayable
        self.default_prompt = str(displayable.get("prompt") or "")
        self.prompt_checker = PromptChecker(text_model_path=text_model_path, max_tokens=max_tokens)

        super().__init__(
            type=InferType.SEGMENTATION,
            labels={LABEL_NAME: 1},
            dimension=3,
            description=(
                "LSMS referring lesion segmentation: type a sentence in 'prompt' (e.g. 'the largest hypodense "
                "lesion in the right lobe'); returns the mask of the lesion(s) it refers to, in the study's "
                "geometry, and the measurement record (found, volume, diameters, HU) in the JSON part. With "
                f"'{CANDIDATES_OPTION}' on, every lesion candidate is its own segment: the chosen ones named after "
                "the prompt, the others 'candidate k (not chosen)', with their scores and measurements in the JSON. "
                f"At most {self.prompt_checker.max_tokens} tokens."
            ),
            config=copy.deepcopy(displayable),
        )
        # One inference at a time: the workflow is CPU/GPU bound and the bundle's writers share the output tree.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ MONAI Label interface
    def is_valid(self) -> bool:
        return self._valid

    def info(self) -> Dict[str, Any]:
        i = super().info()
        i["version"] = self.version
        i["weights_version"] = self._weights().version
        i["prompt"] = {
            "param": "prompt",
            "max_tokens": self.prompt_checker.max_tokens,
            "default": self.default_prompt,
            "empty": "rejected with HTTP 422",
            "too_long": "rejected with HTTP 422",
        }
        return i

    def __call__(self, request: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
        """Run one (image, prompt) request; return the mask file (deleted by the server after sending) and JSON."""
        try:
            return self._infer(request)
        except PromptError as err:
            raise HTTPException(status_code=422, detail=str(err)) from err
        except InferenceInputError as err:
            raise HTTPException(status_code=err.status_code, detail=err.detail) from err

    # ------------------------------------------------------------------ internals
    def _request_options(self, request: Dict[str, Any]) -> Dict[str, Any]:
        options = copy.deepcopy(self.displayable_configs)
        options.update({k: request[k] for k in self.displayable_configs if k in request})
        return options

    def _infer(self, request: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
        begin = time.time()
        options = self._request_options(request)
        options["prompt"] = self.prompt_checker.check(options.get("prompt"))
        with_candidates = _yes(options.get(CANDIDATES_OPTION, False))
        image = request.get("image")
        if not isinstance(image, str) or not image or not os.path.exists(image):
            image_id = request.get("image_id") or image
            raise InferenceInputError(404, f"Image '{image_id}' not found in the datastore (see GET /datastore/).")

        with self._lock, tempfile.TemporaryDirectory(prefix="lsms-label-") as output_dir:
            start = time.time()
            weights = self._weights()  # read per request: a version served since the last one answers this one
            self._run_workflow(image, options, output_dir, weights, with_candidates)
            latency_infer = time.time() - start
            mask_path, record = self._collect_outputs(output_dir)
            candidates_path = mask_path.split("_mask.")[0] + "_candidates.nii.gz"
            names, details = candidate_segments(options["prompt"], record) if with_candidates else ({}, [])
            if names and os.path.isfile(candidates_path):
                mask_path = candidates_path
            else:
                names = {_segment_name(options["prompt"], record.get("found")): 1}
            suffix = ".nii.gz" if mask_path.endswith(".nii.gz") else os.path.splitext(mask_path)[1]
            fd, result_file = tempfile.mkstemp(prefix="lsms-mask-", suffix=suffix)
            os.close(fd)
            shutil.copyfile(mask_path, result_file)

        found = record.get("found") if isinstance(record, dict) else None
        logger.info(
            f"LSMS: prompt={options['prompt']!r} found={found} weights={weights.version} ({time.time() - begin:.2f}s)"
        )
        logger.info(f"LSMS record: {json.dumps(record)}")
        result_json: Dict[str, Any] = {
            "prompt": options["prompt"],
            "found": found,
            "record": record,
            "label_names": names,
            "candidates": details,
            "query": (record.get("referral") or {}).get("query"),
            "explanation": (record.get("referral") or {}).get("explanation"),
            "weights_version": weights.version,
            "latencies": {"infer": round(latency_infer, 2), "total": round(time.time() - begin, 2)},
        }
        return result_file, result_json

    def _weights(self) -> Weights:
        """The weights to answer with: the served version's (``current.json``), else the bundle's."""
        if self.store is None:
            return Weights(BUNDLE, Path(self.bundle_path) / "models")
        return self.store.served()

    def _run_workflow(
        self, image: str, options: Dict[str, Any], output_dir: str, weights: Weights, candidate_map: bool = False
    ) -> None:
        # The request's image and prompt are data: UserDataWorkflow sets them after the config is parsed, so no
        # character of them reaches MONAI's config parser (no expression, reference or macro is ever read).
        from custom.user_inputs import UserDataWorkflow

        data = {key: value for key, value in options.items() if key in self._top_level_ids}
        data["image"] = image
        # A trained version's weights folder replaces the bundle's (the ids checkpoint and referral_scorer_path
        # are files of ckpt_dir); the bundle's own weights leave the config as it is.
        weights_override = {} if weights.version == BUNDLE else {"ckpt_dir": str(weights.models_dir)}
        workflow = UserDataWorkflow(
            config_file=self.config_path,
            data=data,
            meta_file=self.meta_path if os.path.isfile(self.meta_path) else None,
            logging_file=False,  # keep the server's logging as it is
            bundle_root=self.bundle_path,
            output_dir=output_dir,
            candidate_map=bool(candidate_map),
            **weights_override,
        )
        added = self.bundle_path  # ConfigWorkflow.run() puts the bundle folder on sys.path on every call
        count_before = sys.path.count(added)
        try:
            workflow.initialize()
            workflow.run()
            workflow.finalize()
        except Exception as err:
            # MONAI wraps errors of config expressions in RuntimeError: look for a bad-input error in the chain
            cause = _input_error_in(err)
            if cause is not None:
                raise InferenceInputError(422, str(cause)) from err
            raise
        finally:
            while sys.path.count(added) > count_before:
                sys.path.remove(added)

    @staticmethod
    def _collect_outputs(output_dir: str) -> Tuple[str, Dict[str, Any]]:
        """The one mask the bundle wrote under ``output_dir`` and the JSON record beside it."""
        masks = sorted(glob.glob(os.path.join(output_dir, "**", "*_mask.nii.gz"), recursive=True))
        masks = masks or sorted(glob.glob(os.path.join(output_dir, "**", "*_mask.*"), recursive=True))
        if len(masks) != 1:
            raise RuntimeError(f"The bundle wrote {len(masks)} masks for one (image, prompt); expected exactly one.")
        mask_path = masks[0]
        folder, name = os.path.split(mask_path)
        stem = name.split("_mask.")[0]
        candidates = [os.path.join(folder, f"{stem}_record.json"), os.path.join(folder, f"{stem}.json")]
        candidates += sorted(glob.glob(os.path.join(folder, "*.json")))
        for path in candidates:
            if os.path.isfile(path):
                with open(path) as f:
                    record = json.load(f)
                outputs = record.get("outputs") if isinstance(record, dict) else None
                if not isinstance(outputs, dict) or outputs.get("mask") in (None, name):
                    return mask_path, record
        logger.warning(f"LSMS: no record beside {mask_path}")
        return mask_path, {}


def _input_error_in(err: BaseException) -> Optional[BaseException]:
    """The bundle's input error (``custom.errors.InputError``: answered 422, not 500) in the chain of ``err``."""
    from custom.errors import find_input_error

    return find_input_error(err)
