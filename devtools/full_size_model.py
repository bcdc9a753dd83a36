"""Build a full-size SDXL + Canny ControlNet with random weights, offline.

The configurations are those published with stabilityai/stable-diffusion-xl-base-1.0
(UNet 2.57 B parameters, CLIP ViT-L/14 and OpenCLIP bigG text encoders, VAE),
diffusers/controlnet-canny-sdxl-1.0 (1.25 B) and madebyollin/sdxl-vae-fp16-fix,
so every layer has its real shape and a GPU does the real amount of work. The
weights are random, so the pictures are noise: this model is for timing and
memory figures only, and needs no Hugging Face hub. It is written in fp16 with
``save_pretrained`` (about 9.5 GB) in the layout the service loads:

    OUTPUT/base        SDXL base pipeline (text encoders, tokenizers, UNet, VAE, scheduler)
    OUTPUT/controlnet  Canny ControlNet
    OUTPUT/vae         fp16-fix VAE

    python -m devtools.full_size_model models/full-size [--device cuda]

The tokenizers are byte-level stand-ins (no BPE merges): prompts tokenize to
other ids than with CLIP's vocabulary, but the text encoders always run on 77
positions, so the cost is the same.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from devtools.tiny_model import BASE_SUBDIR, CONTROLNET_SUBDIR, VAE_SUBDIR

# What the UNet and the ControlNet share: the ControlNet is a copy of the UNet's encoder.
_SHARED = dict(
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,  # 768 + 1280: both text encoders' hidden states
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    in_channels=4,
    layers_per_block=2,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled + 6 × 256 size/crop ids
    transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
)
UNET_CONFIG = dict(
    _SHARED,
    out_channels=4,
    sample_size=128,
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)
CONTROLNET_CONFIG = dict(_SHARED, conditioning_embedding_out_channels=[16, 32, 96, 256])
VAE_CONFIG = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=False,  # the fp16-fix VAE runs in fp16
)
VOCAB_SIZE = 49408
TEXT_ENCODER_CONFIG = dict(  # CLIP ViT-L/14's text model
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    projection_dim=768,
    hidden_act="quick_gelu",
)
TEXT_ENCODER_2_CONFIG = dict(  # OpenCLIP ViT-bigG/14's text model, with its projection
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
    hidden_act="gelu",
)
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
)


def _bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) printable stand-in for each of the 256 byte values."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer: every byte, its word-final variant and the two specials."""
    chars = _bytes_to_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[],
        model_max_length=77,
    )


def text_config(tokenizer: CLIPTokenizer, **shape: object) -> CLIPTextConfig:
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos,
        pad_token_id=eos,
        **shape,
    )


def build_components(device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """The five networks with random weights in fp32 on ``device``; ``"meta"`` allocates
    nothing, for counting parameters."""
    tokenizer = build_tokenizer()
    with torch.device(device):
        return {
            "unet": UNet2DConditionModel(**UNET_CONFIG),
            "controlnet": ControlNetModel(**CONTROLNET_CONFIG),
            "vae": AutoencoderKL(**VAE_CONFIG),
            "text_encoder": CLIPTextModel(text_config(tokenizer, **TEXT_ENCODER_CONFIG)),
            "text_encoder_2": CLIPTextModelWithProjection(
                text_config(tokenizer, **TEXT_ENCODER_2_CONFIG)
            ),
        }


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def is_built(output_dir: Path) -> bool:
    output_dir = Path(output_dir)
    return all(
        (output_dir / sub / name).is_file()
        for sub, name in [
            (BASE_SUBDIR, "model_index.json"),
            (CONTROLNET_SUBDIR, "config.json"),
            (VAE_SUBDIR, "config.json"),
        ]
    )


def build(output_dir: Path, device: str | None = None, seed: int = 0) -> Path:
    """Write the model under ``output_dir`` unless it is there already.

    The weights are drawn in fp32 on ``device`` (the GPU when there is one: much faster
    than the CPU) and saved in fp16. The model is written next to ``output_dir`` and
    moved into place at the end, so an interrupted build is never taken for a model.
    """
    output_dir = Path(output_dir)
    if is_built(output_dir):
        return output_dir
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(seed)
    # One network at a time in fp32, halved at once: the UNet alone is 10 GB in fp32.
    tokenizer = build_tokenizer()
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIG).half()
        vae = AutoencoderKL(**VAE_CONFIG).half()
        text_encoder = CLIPTextModel(text_config(tokenizer, **TEXT_ENCODER_CONFIG)).half()
        text_encoder_2 = CLIPTextModelWithProjection(
            text_config(tokenizer, **TEXT_ENCODER_2_CONFIG)
        ).half()
    base = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )
    base.save_pretrained(partial / BASE_SUBDIR)
    vae.save_pretrained(partial / VAE_SUBDIR)
    del base, unet, vae, text_encoder, text_encoder_2
    with torch.device(device):
        controlnet = ControlNetModel(**CONTROLNET_CONFIG).half()
    controlnet.save_pretrained(partial / CONTROLNET_SUBDIR)
    del controlnet
    if device == "cuda":  # the caching allocator keeps what the build drew: give it back
        torch.cuda.empty_cache()
    shutil.rmtree(output_dir, ignore_errors=True)
    partial.rename(output_dir)
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="directory to write the model to")
    parser.add_argument("--device", help="where to draw the weights (default: cuda if present)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args()
    if is_built(args.output_dir):
        print(f"full-size model already in {args.output_dir}")
        return
    print(f"building the full-size model in {args.output_dir} (about 9.5 GB)")
    print(f"full-size model written to {build(args.output_dir, args.device, args.seed)}")


if __name__ == "__main__":
    main()
