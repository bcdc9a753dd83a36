"""The full-size random-weight model has SDXL's published shapes, counted on the meta
device: nothing is allocated, so this runs in seconds on any machine."""

from __future__ import annotations

import pytest

from devtools import full_size_model

# Published parameter counts: SDXL base's UNet and text encoders (CLIP ViT-L/14's text
# model; OpenCLIP bigG's, with projection), its VAE, and the SDXL Canny ControlNet.
PUBLISHED = {
    "unet": 2.567e9,
    "controlnet": 1.251e9,
    "text_encoder": 123.06e6,
    "text_encoder_2": 694.66e6,
    "vae": 83.65e6,
}


@pytest.fixture(scope="module")
def components() -> dict:
    return full_size_model.build_components("meta")


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_counts_are_the_published_ones(components: dict, name: str) -> None:
    count = full_size_model.parameter_count(components[name])
    assert count == pytest.approx(PUBLISHED[name], rel=0.01)


def test_nothing_is_allocated_on_the_meta_device(components: dict) -> None:
    devices = {p.device.type for module in components.values() for p in module.parameters()}
    assert devices == {"meta"}


def test_the_unet_and_controlnet_take_sdxl_conditioning(components: dict) -> None:
    unet, controlnet = components["unet"].config, components["controlnet"].config
    # Both encoders' hidden states (768 + 1280), and the pooled embedding with 6 size ids.
    assert unet.cross_attention_dim == controlnet.cross_attention_dim == 768 + 1280
    assert unet.projection_class_embeddings_input_dim == 1280 + 6 * 256
    assert unet.transformer_layers_per_block == controlnet.transformer_layers_per_block
    assert components["vae"].config.force_upcast is False  # fp16-fix: stays in fp16


def test_any_prompt_tokenizes_to_77_known_ids() -> None:
    tokenizer = full_size_model.build_tokenizer()
    ids = tokenizer(
        "a lighthouse, ünïcode ☃ and 😀 " * 20, padding="max_length", truncation=True
    ).input_ids
    assert len(ids) == 77
    assert max(ids) < full_size_model.VOCAB_SIZE
    assert tokenizer.unk_token_id not in ids[1:-1]  # every byte has a token


def test_an_incomplete_directory_is_not_a_model(tmp_path) -> None:
    assert not full_size_model.is_built(tmp_path)
    for sub, name in [("base", "model_index.json"), ("controlnet", "config.json")]:
        (tmp_path / sub).mkdir()
        (tmp_path / sub / name).write_text("{}")
    assert not full_size_model.is_built(tmp_path)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    assert full_size_model.is_built(tmp_path)
