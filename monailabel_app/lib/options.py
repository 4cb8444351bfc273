"""The app's yes/no ``--conf`` options that open what is closed by default (see README.md, "What is refused")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

_YES = {"true", "yes", "1", "on"}
_NO = {"false", "no", "0", "off"}

TRAINING_NEEDS_WRITES = (
    "--conf training true needs --conf datastore_writes true: the labels to train on reach the server as datastore "
    "writes (3D Slicer's Submit Label). Start the server with both options, or without training."
)


def yes_no(value) -> Optional[bool]:
    """A yes/no value: a bool, or true/yes/1/on or false/no/0/off as text in any case; None when it is neither."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in _YES else False if text in _NO else None


def conf_flag(conf: Mapping[str, str], key: str) -> bool:
    """The yes/no ``--conf key value`` option ``key`` (false when absent); a value that is neither is refused."""
    flag = yes_no(conf.get(key, "false"))
    if flag is not None:
        return flag
    raise ValueError(f"--conf {key} {conf.get(key)!r} is not a yes/no value. Pass --conf {key} true or false.")


@dataclass(frozen=True)
class AppOptions:
    """What the server opens beyond reading studies and answering prompts (all off by default).

    Attributes:
        allow_remote: listen on an address other machines can reach (``--host 0.0.0.0``), and answer their requests.
        datastore_writes: let clients add, change and delete studies, labels and their info in the studies folder.
        logs: serve the server log at ``GET /logs/``.
        training: offer ``POST /train/lsms`` (fine-tuning on the submitted labels) and its status and stop
            endpoints; needs ``datastore_writes``.
    """

    allow_remote: bool = False
    datastore_writes: bool = False
    logs: bool = False
    training: bool = False

    def __post_init__(self):
        if self.training and not self.datastore_writes:
            raise ValueError(TRAINING_NEEDS_WRITES)

    @classmethod
    def from_conf(cls, conf: Optional[Mapping[str, str]]) -> "AppOptions":
        """Read ``allow_remote``, ``datastore_writes``, ``logs`` and ``training`` from the ``--conf`` options."""
        conf = conf or {}
        return cls(
            allow_remote=conf_flag(conf, "allow_remote"),
            datastore_writes=conf_flag(conf, "datastore_writes"),
            logs=conf_flag(conf, "logs"),
            training=conf_flag(conf, "training"),
        )
