"""Inputs of text-conditioned inference: (image, prompt) pairs, checked before any model work."""

from __future__ import annotations

import json
from pathlib import Path

from custom.errors import InputError
from custom.text import DEFAULT_MAX_TOKENS, load_tokenizer

__all__ = ["MAX_PROMPT_CHARS", "PromptError", "check_one_input", "check_prompt", "images_in", "prompt_items"]


#: A prompt longer than this many characters is refused before it is tokenized (32 tokens are far shorter).
MAX_PROMPT_CHARS = 1000
#: The longest word read as a word: the tokenizer reads a longer one (100 characters for BERT's WordPiece) as one
#: unknown token, so a prompt of one huge "word" would pass any token limit unread.
MAX_WORD_CHARS = 64


class PromptError(InputError, ValueError):
    """A prompt or an (image, prompt) list that inference cannot use."""


def check_prompt(prompt: str, max_tokens: int = DEFAULT_MAX_TOKENS, tokenizer=None) -> str:
    """Return the stripped prompt, or raise :class:`PromptError` if it is empty or longer than ``max_tokens``."""
    text = (prompt or "").strip() if isinstance(prompt, str) or prompt is None else None
    if text is None:
        raise PromptError(f"The prompt must be text, got {type(prompt).__name__}.")
    if not text:
        raise PromptError(
            "The prompt is empty. Describe the lesion to segment, e.g. --prompt 'the largest lesion in the right lobe'."
        )
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(
            f"The prompt has {len(text)} characters, far more than the {max_tokens} tokens the model reads. "
            "Shorten it to one lesion description (lobe or segment, size, density, position)."
        )
    longest = max(text.split(), key=len)
    if len(longest) > MAX_WORD_CHARS:
        raise PromptError(
            f"The prompt holds a 'word' of {len(longest)} characters ({longest[:20]!r}...), which the model cannot "
            "read. Describe the lesion in words, e.g. --prompt 'the largest lesion in the right lobe'."
        )
    if tokenizer is None:
        tokenizer = load_tokenizer()
    count = len(tokenizer(text)["input_ids"])
    if count > max_tokens:
        raise PromptError(
            f"The prompt has {count} tokens, more than the {max_tokens} the model reads. "
            "Shorten it to one lesion description (lobe or segment, size, density, position)."
        )
    return text


def check_one_input(
    image: str | None, datalist: str | None, dataset_dir: str | None, prompt_given: bool | None = None
) -> None:
    """Refuse a combination of inputs of which one would be ignored (see :func:`prompt_items`)."""
    given = [f"--{name}" for name, value in (("image", image), ("datalist", datalist), ("dataset_dir", dataset_dir))
             if value not in (None, "")]  # fmt: skip
    if len(given) > 1:
        raise PromptError(f"{' and '.join(given)} are both given, and one of them would be ignored. Pass only one.")
    if prompt_given is None:
        return
    if datalist and prompt_given:
        raise PromptError(
            "--prompt is given with --datalist, whose entries carry their own prompts; it would be ignored. "
            "Remove --prompt, or put the prompt in the datalist entries."
        )
    if (image or dataset_dir) and not prompt_given:
        raise PromptError(
            f"{given[0]} is given without --prompt. Say what to segment, e.g. --prompt 'the largest hypodense lesion'."
        )


def images_in(folder: str | Path) -> list[Path]:
    """NIfTI files and DICOM series folders (folders holding ``.dcm`` files) directly inside ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PromptError(f"The dataset folder {folder} does not exist; pass a folder of NIfTI files or DICOM series.")
    found = sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() and p.name.endswith((".nii", ".nii.gz"))) or (p.is_dir() and any(p.glob("*.dcm")))
    )
    if not found:
        raise PromptError(f"The dataset folder {folder} holds no .nii/.nii.gz file and no folder of .dcm files.")
    return found


def prompt_items(
    image: str | None,
    prompt: str | None,
    datalist: str | None = None,
    dataset_dir: str | None = None,
    tokenizer=None,
    text_model_path: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sample_image: str | None = None,
    prompt_given: bool | None = None,
) -> list[dict]:
    """Items ``{"image": path, "text": prompt}`` for inference, from the first of these that is given:

    - ``datalist``: a JSON file holding ``[{"image": ..., "prompt": ...}, ...]`` (paths relative to the file);
    - ``dataset_dir``: every NIfTI file and DICOM series folder in it, each with ``prompt``;
    - ``image`` with ``prompt`` (``image`` None: ``sample_image``, the bundle's sample CT).

    Prompts are counted with ``tokenizer``, else the one of ``text_model_path`` (the network's text encoder).
    Inputs that would be ignored are refused: two of ``image``, ``datalist`` and ``dataset_dir``, and, when
    ``prompt_given`` is known (True/False, from the command line), a prompt beside a ``datalist`` (whose entries
    have their own) or an ``image`` or ``dataset_dir`` without one (only the sample CT has a default prompt).
    """
    check_one_input(image, datalist, dataset_dir, prompt_given)
    if tokenizer is None:
        tokenizer = load_tokenizer(text_model_path)
    if dataset_dir and not datalist:
        return [
            {"image": str(path), "text": check_prompt(prompt, max_tokens, tokenizer)} for path in images_in(dataset_dir)
        ]
    if datalist:
        path = Path(datalist)
        if not path.is_file():
            raise PromptError(f"The prompt list {path} does not exist; pass a JSON file of image/prompt pairs.")
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise PromptError(f"The prompt list {path} is not valid JSON: {err}.") from err
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and {"image", "prompt"} <= set(e) for e in entries
        ):
            raise PromptError(f"The prompt list {path} must be a JSON list of {{'image': ..., 'prompt': ...}} objects.")
        if not entries:
            raise PromptError(f"The prompt list {path} is empty; add {{'image': ..., 'prompt': ...}} entries.")
        for n, entry in enumerate(entries):
            if not isinstance(entry["image"], str) or not entry["image"].strip():
                raise PromptError(f"Entry {n} of {path} has image {entry['image']!r}; give the image path as text.")
        pairs = [((path.parent / e["image"]), e["prompt"]) for e in entries]
    else:
        image = sample_image if image is None else image
        if not image:
            raise PromptError("No image given: pass --image <NIfTI file or DICOM folder> (or --datalist <json>).")
        pairs = [(Path(image), prompt)]
    items = []
    for image_path, text in pairs:
        if not image_path.exists():
            raise PromptError(f"The image {image_path} does not exist; pass a NIfTI file or a DICOM series folder.")
        items.append({"image": str(image_path), "text": check_prompt(text, max_tokens, tokenizer)})
    return items
