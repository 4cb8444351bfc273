"""Checks of the free-text prompt before it reaches the bundle.

The bundle's tokenizer pads or *truncates* an expression to ``max_tokens`` (32 by default, special tokens
included), so a longer sentence would silently lose its end ("... in the right lobe" could vanish). The server
therefore refuses such a prompt with a message that says how long it is and what the limit is, and refuses an
empty prompt instead of guessing what the radiologist meant. Both answers are HTTP 422.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

#: A prompt longer than this many characters is refused before tokenizing it.
MAX_PROMPT_CHARS = 1000


class PromptError(ValueError):
    """A prompt the model cannot be given as it is (empty, not text, or over the token limit)."""


class PromptChecker:
    """Validate prompts with the same tokenizer and limit as the bundle.

    Args:
        text_model_path: the bundle's ``text_model_path`` (a local Hugging Face folder); None: the default encoder
            of ``custom.text.default_text_model_path()``.
        max_tokens: the bundle's ``max_tokens``; None: ``custom.text.DEFAULT_MAX_TOKENS``.
    """

    def __init__(self, text_model_path: Optional[str] = None, max_tokens: Optional[int] = None):
        self.text_model_path = text_model_path
        if max_tokens is None:
            from custom.text import DEFAULT_MAX_TOKENS

            max_tokens = DEFAULT_MAX_TOKENS
        self.max_tokens = int(max_tokens)
        self._tokenizer = None
        self._lock = threading.Lock()

    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                path = self.text_model_path
                if not path:
                    from custom.text import default_text_model_path

                    path = default_text_model_path()
                self._tokenizer = AutoTokenizer.from_pretrained(path)
            return self._tokenizer

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text``, special tokens included (what the bundle's limit counts)."""
        return len(self.tokenizer()(text, add_special_tokens=True, truncation=False)["input_ids"])

    def check(self, prompt: Any) -> str:
        """Return the prompt with surrounding white space removed, or raise :class:`PromptError`."""
        if prompt is None:
            prompt = ""
        if not isinstance(prompt, str):
            raise PromptError(f"'prompt' must be text, got {type(prompt).__name__}.")
        prompt = prompt.strip()
        if not prompt:
            raise PromptError(
                "The prompt is empty. Type a sentence that describes the lesion, "
                "e.g. 'the largest hypodense lesion in the right lobe'."
            )
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptError(
                f"The prompt has {len(prompt)} characters; the model reads at most {self.max_tokens} tokens "
                "(about 20 words). Shorten it."
            )
        count = self.count_tokens(prompt)
        if count > self.max_tokens:
            raise PromptError(
                f"The prompt has {count} tokens; the model reads at most {self.max_tokens} "
                "(special tokens included), and a longer prompt would be cut. Shorten it."
            )
        return prompt
