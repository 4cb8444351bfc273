"""MONAI Label app that serves this repository's LSMS bundle (referring lesion segmentation with a free-text prompt).

Start it from anywhere (see README.md beside this file)::

    monailabel start_server --app monailabel_app --studies /path/to/studies --conf models lsms

``--conf`` options:

- ``models``: ``lsms`` (the default, and the only model; ``all`` means the same).
- ``bundle_path``: the bundle folder; default: the ``bundle/`` folder of this repository. The bundle is used from
  disk as it is: nothing is downloaded from the model zoo.
- ``config_file``: the inference config in ``<bundle_path>/configs``; default ``inference.json``.
"""

import logging
import os
from typing import Dict

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

from lib.infer import LSMSReferringInfer

logger = logging.getLogger(__name__)

APP_DIR = os.path.dirname(os.path.realpath(__file__))
#: The bundle of this repository (``<repo>/bundle``); its Python components are ``<repo>/custom``.
DEFAULT_BUNDLE_PATH = os.path.join(os.path.dirname(APP_DIR), "bundle")
MODEL_NAME = "lsms"


class MyApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        conf = dict(conf or {})
        self.bundle_path = os.path.realpath(os.path.expanduser(conf.get("bundle_path", DEFAULT_BUNDLE_PATH)))
        self.config_file = conf.get("config_file", "inference.json")

        models = [m.strip() for m in conf.get("models", MODEL_NAME).split(",") if m.strip()]
        unknown = [m for m in models if m not in (MODEL_NAME, "all")]
        if unknown:
            raise ValueError(f"Unknown model(s) {unknown}; this app serves only '{MODEL_NAME}' (--conf models lsms).")
        if not os.path.isdir(self.bundle_path):
            raise FileNotFoundError(f"Bundle folder not found: {self.bundle_path} (set it with --conf bundle_path).")

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="LSMS referring lesion segmentation",
            description="Type a sentence; get the 3D mask and the measurements of the lesion(s) it refers to.",
            version="1.0",
        )

    def init_infers(self) -> Dict[str, InferTask]:
        task = LSMSReferringInfer(self.bundle_path, config_file=self.config_file, conf=self.conf)
        logger.info(f"+++ Adding Inferer:: {MODEL_NAME} => bundle {self.bundle_path} (valid: {task.is_valid()})")
        return {MODEL_NAME: task}

    def infer(self, request, datastore=None):
        # keep the id the client sent: MONAI Label replaces "image" by the file path (empty for an unknown id)
        request = dict(request)
        request.setdefault("image_id", request.get("image"))
        return super().infer(request, datastore)
