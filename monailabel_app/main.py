"""MONAI Label app that serves this repository's LSMS bundle (referring lesion segmentation with a free-text prompt).

Start it from anywhere (see README.md beside this file)::

    monailabel start_server --app monailabel_app --studies /path/to/studies --conf models lsms

``--conf`` options:

- ``models``: ``lsms`` (the default, and the only model; ``all`` means the same).
- ``bundle_path``: the bundle folder; default: the ``bundle/`` folder of this repository. The bundle is used from
  disk as it is: nothing is downloaded from the model zoo.
- ``config_file``: the inference config in ``<bundle_path>/configs``; default ``inference.json``.
- ``allow_remote``: ``true`` to listen on an address other machines can reach (with ``--host``); default ``false``:
  the server listens on 127.0.0.1 and refuses other addresses (``lib/network.py``).
- ``datastore_writes``: ``true`` to let clients add, change and delete studies and labels; default ``false``
  (``lib/datastore.py``).
- ``logs``: ``true`` to serve the server log at ``GET /logs/``; default ``false``.
- ``training``: ``true`` to offer ``POST /train/lsms``: fine-tune on the studies labelled in 3D Slicer and serve the
  new weights when they are better on the held-out studies (``lib/train.py``); needs ``datastore_writes true``;
  default ``false``.
- ``model_dir``: where the trained versions and the served-version pointer are kept (``<model_dir>/lsms``);
  default: the ``model/`` folder of this app.

Every request passes the app's guard first (``lib/guard.py``): endpoints the app does not offer are 404/405 with a
detail, and inference requests whose options would be lost are 4xx.
"""

import logging
import os
from typing import Dict

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.datastore import WRITES_OFF, GuardedDatastore, check_name
from lib.guard import guard_requests
from lib.infer import LSMSReferringInfer, code_root_of
from lib.network import check_bind_address
from lib.options import AppOptions
from lib.train import LSMSFineTune
from lib.versions import VersionStore

logger = logging.getLogger(__name__)

APP_DIR = os.path.dirname(os.path.realpath(__file__))
#: The bundle of this repository (``<repo>/bundle``); its Python components are ``<repo>/custom``.
DEFAULT_BUNDLE_PATH = os.path.join(os.path.dirname(APP_DIR), "bundle")
MODEL_NAME = "lsms"


class MyApp(MONAILabelApp):
    """The LSMS model on a studies folder, read-only and for this machine only unless the ``--conf`` options open it."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        conf = dict(conf or {})
        self.options = AppOptions.from_conf(conf)
        check_bind_address(self.options.allow_remote)  # before anything slow: uvicorn has not opened its socket yet
        # not ``self.bundle_path``: that is a method of MONAILabelApp, called when a training run starts
        self.bundle_dir = os.path.realpath(os.path.expanduser(conf.get("bundle_path", DEFAULT_BUNDLE_PATH)))
        self.config_file = conf.get("config_file", "inference.json")

        models = [m.strip() for m in conf.get("models", MODEL_NAME).split(",") if m.strip()]
        unknown = [m for m in models if m not in (MODEL_NAME, "all")]
        if unknown:
            raise ValueError(f"Unknown model(s) {unknown}; this app serves only '{MODEL_NAME}' (--conf models lsms).")
        if not os.path.isdir(self.bundle_dir):
            raise FileNotFoundError(f"Bundle folder not found: {self.bundle_dir} (set it with --conf bundle_path).")
        model_dir = os.path.realpath(os.path.expanduser(conf.get("model_dir", os.path.join(app_dir, "model"))))
        self.versions = VersionStore(os.path.join(model_dir, MODEL_NAME), os.path.join(self.bundle_dir, "models"))
        guard_requests(self.options)

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="LSMS referring lesion segmentation",
            description="Type a sentence; get the 3D mask and the measurements of the lesion(s) it refers to.",
            version="1.0",
        )

    def init_datastore(self) -> Datastore:
        """MONAI Label's datastore of ``--studies``, its writes refused unless ``--conf datastore_writes true``."""
        return GuardedDatastore(super().init_datastore(), writes=self.options.datastore_writes)

    def init_infers(self) -> Dict[str, InferTask]:
        task = LSMSReferringInfer(self.bundle_dir, config_file=self.config_file, conf=self.conf, store=self.versions)
        logger.info(
            f"+++ Adding Inferer:: {MODEL_NAME} => bundle {self.bundle_dir} (valid: {task.is_valid()}; weights: "
            f"{task.info()['weights_version']})"
        )
        return {MODEL_NAME: task}

    def init_trainers(self) -> Dict[str, TrainTask]:
        """The ``lsms`` fine-tuning with ``--conf training true``; no trainer otherwise."""
        if not self.options.training:
            return {}
        task = LSMSFineTune(self.bundle_dir, self.versions, code_root_of(self.bundle_dir))
        logger.info(f"+++ Adding Trainer:: {MODEL_NAME} => versions in {self.versions.root}")
        return {MODEL_NAME: task}

    def infer(self, request, datastore=None):
        """Check the model and the image before MONAI Label runs the request.

        Only images of the studies datastore are read: an image id, never a server path (MONAI Label would read
        any existing path, or an uploaded file). Unknown models and images are 404s with a clear detail.
        """
        request = dict(request)
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"Unknown model '{model}'; this server serves '{MODEL_NAME}'.")
        image_id = request.get("image")
        store = datastore or self.datastore()
        if not isinstance(image_id, str) or image_id not in set(store.list_images()):
            raise HTTPException(
                status_code=404,
                detail=f"Image '{image_id}' is not in this server's studies datastore; pass the id of a study "
                "listed by GET /datastore/ (server paths and uploaded files are not read).",
            )
        self._check_save_label(request)
        request["image_id"] = image_id  # MONAI Label replaces "image" by the file path
        return super().infer(request, store)

    def _check_save_label(self, request) -> None:
        """Refuse, before inference, an answer to be saved as a label (``save_label``) that would be refused after.

        MONAI Label saves the mask in the studies folder under ``label_tag`` when ``save_label`` is true (any value
        Python counts as true, the string "false" included): a datastore write.
        """
        if not request.get("save_label"):
            return
        if not self.options.datastore_writes:
            raise HTTPException(status_code=403, detail=f"'save_label' saves the answer as a label. {WRITES_OFF}")
        check_name(request.get("label_tag", "original"), "label tag")

    def next_sample(self, request):
        """The next study of an active-learning strategy the app offers; 404 with a detail for another one."""
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            offered = ", ".join(sorted(self._strategies)) or "none"
            raise HTTPException(
                status_code=404, detail=f"Unknown active-learning strategy '{strategy}'. This server offers: {offered}."
            )
        return super().next_sample(request)
