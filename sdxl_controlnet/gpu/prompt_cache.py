"""SDXL's two text encoders run once per prompt, not once per request: a bounded LRU of their
outputs, keyed by everything that changes them (both prompts, both negative prompts, and the
LoRA adapters in force, which may reach into the text encoders). A repeated prompt (a studio
session, a batch of seeds, a job retried) skips them, with the same bytes out: diffusers
takes the embeddings as given and repeats them per image as it would its own."""

from __future__ import annotations

from collections import OrderedDict

import torch
from diffusers import StableDiffusionXLControlNetPipeline

from ..schemas import GenerationParams

Key = tuple[str, str | None, str | None, str | None, tuple[tuple[str, float], ...]]


class PromptEmbeddings:
    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[Key, dict[str, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self,
        pipe: StableDiffusionXLControlNetPipeline,
        params: GenerationParams,
        adapters: tuple[tuple[str, float], ...],
    ) -> dict[str, torch.Tensor]:
        """The pipeline's embedding arguments for ``params``' prompts under ``adapters``."""
        key = (params.prompt, params.prompt_2, params.negative_prompt, params.negative_prompt_2)
        key = (*key, adapters)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        # With guidance's negative side always: a request without guidance ignores it.
        embeds = pipe.encode_prompt(
            prompt=params.prompt,
            prompt_2=params.prompt_2,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=params.negative_prompt,
            negative_prompt_2=params.negative_prompt_2,
        )
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds")
        entry = dict(zip((*names, "negative_pooled_prompt_embeds"), embeds, strict=True))
        self._entries[key] = entry
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return entry
