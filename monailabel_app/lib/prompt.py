"""Checks of the free-text prompt before a request reaches the bundle's workflow.

The rule is the bundle's own (``custom.prompts.check_prompt``: text, not empty, at most ``max_tokens`` tokens
with special tokens included), applied with the tokenizer and limit of the served config, so that the server
answers a bad prompt at once with a clear HTTP 422 instead of starting a workflow. The tokenizer is loaded once
per server. A prompt far over any token limit (``custom.prompts.MAX_PROMPT_CHARS``) is refused before it is tokenized.
"""

from __future__ import annotations

import threading
from typing import Any, Optional


class PromptError(ValueError):
    """A prompt the model cannot be given as it is (empty, not text, or over the token limit)."""


class PromptChecker:
    """Validate prompts with the same tokenizer and limit as the bundle.

    Args:
        text_model_path: the config's ``text_model_path`` (a local Hugging Face folder); None: the default encoder
            of ``custom.text.default_text_model_path()``.
        max_tokens: the config's ``max_tokens``; None: ``custom.text.DEFAULT_MAX_TOKENS``.
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
                from custom.text import load_tokenizer

                self._tokenizer = load_tokenizer(self.text_model_path)
            return self._tokenizer

    def check(self, prompt: Any) -> str:
        """Return the prompt with surrounding white space removed, or raise :class:`PromptError`."""
        from custom import prompts

        try:
            return prompts.check_prompt(prompt, max_tokens=self.max_tokens, tokenizer=self.tokenizer())
        except prompts.PromptError as err:
            raise PromptError(str(err)) from err
