"""Build a tiny random-weight SDXL ControlNet pipeline from configs, offline.

The result has SDXL's architecture (two CLIP text encoders, a UNet with
``text_time`` conditioning, a ControlNet whose conditioning embedding matches
the VAE's x8 downsampling) at a fraction of the width, so the service, the
tests and the demo run the real diffusers code path on a CPU in milliseconds
per step. The weights are random: the pictures are noise, the shapes are real.

    python -m devtools.tiny_model models/tiny
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    ControlNetModel,
    ControlNetUnionModel,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from devtools.tiny_layout import (
    BASE_SUBDIR,
    CONTROLNET_SUBDIR,
    DEPTH_SUBDIR,
    IP_ADAPTER_SUBDIR,
    PREVIEW_SUBDIR,
    UNION_SUBDIR,
    VAE_SUBDIR,
)
from sdxl_controlnet.controls import UNION_MODE_COUNT
from sdxl_controlnet.gpu.model_refs import IP_ADAPTER_VARIANTS

IMAGE_HIDDEN_SIZE = 32
IMAGE_EMBED_DIM = 16

TEXT_HIDDEN_SIZE = 32
TIME_EMBED_DIM = 8
# SDXL's added condition: the pooled text embedding plus six size/crop ids.
TEXT_TIME_INPUT_DIM = 6 * TIME_EMBED_DIM + TEXT_HIDDEN_SIZE

UNET_KWARGS = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    in_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    transformer_layers_per_block=1,
    projection_class_embeddings_input_dim=TEXT_TIME_INPUT_DIM,
    # Both encoders' hidden states are concatenated, as in SDXL.
    cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
)


def build_tokenizer() -> CLIPTokenizer:
    """A small CLIP BPE tokenizer: every printable character, its word-final
    variant and a few merges (each merge's parts are in the vocabulary)."""
    chars = [c for c in string.printable if not c.isspace()]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("e", "r</w>")]
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=merges,
        model_max_length=77,
    )


def text_encoder_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=TEXT_HIDDEN_SIZE,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_act="gelu",
    )


def build(output_dir: Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save base, ControlNet and VAE under ``output_dir``."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = text_encoder_config(tokenizer)

    unet = UNet2DConditionModel(
        sample_size=32,
        out_channels=4,
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **UNET_KWARGS,
    )
    controlnet = tiny_controlnet()
    # Four blocks make the VAE downsample x8, like SDXL's; latents keep SDXL's cost shape.
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
        force_upcast=False,  # as the fp16-fix VAE: no float32 round trip at each encode
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    base = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )
    output_dir = Path(output_dir)
    base.save_pretrained(output_dir / BASE_SUBDIR)
    controlnet.save_pretrained(output_dir / CONTROLNET_SUBDIR)
    vae.save_pretrained(output_dir / VAE_SUBDIR)
    build_preview(output_dir, seed)
    build_controls(output_dir, seed)
    build_ip_adapter(output_dir, seed)
    return output_dir


def tiny_controlnet() -> ControlNetModel:
    # Four stages of x2: the control image is embedded at the latent resolution.
    return steering(
        ControlNetModel(conditioning_embedding_out_channels=(8, 8, 8, 8), **UNET_KWARGS)
    )


def steering(controlnet: ControlNetModel | ControlNetUnionModel) -> torch.nn.Module:
    """``controlnet`` made to steer: a new one's zero convolutions are zeros (training starts
    from no effect), and its control image embedding, at default initialisation, passes on
    its biases and hardly the picture. A control image that changes no pixel proves nothing."""
    zeros = (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block)
    for conv in zeros:
        torch.nn.init.normal_(conv.weight, std=0.1)
    for conv in controlnet.controlnet_cond_embedding.modules():
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.normal_(conv.weight, std=0.3)
            torch.nn.init.zeros_(conv.bias)
    return controlnet


def build_controls(output_dir: Path, seed: int = 0) -> Path:
    """A second tiny ControlNet (the depth one of ``SDXL_CONTROLNETS=canny=…,depth=…``) and
    a tiny ControlNet Union with the control types of xinsir's, under ``output_dir``."""
    torch.manual_seed(seed + 1)
    tiny_controlnet().save_pretrained(Path(output_dir) / DEPTH_SUBDIR)
    union = ControlNetUnionModel(
        conditioning_embedding_out_channels=(8, 8, 8, 8),
        num_control_type=UNION_MODE_COUNT,
        # Its condition transformer works at the first block's width, as SDXL's at 320.
        num_trans_channel=UNET_KWARGS["block_out_channels"][0],
        num_trans_head=2,
        num_proj_channel=UNET_KWARGS["block_out_channels"][0],
        **UNET_KWARGS,
    )
    steering(union).save_pretrained(Path(output_dir) / UNION_SUBDIR)
    return Path(output_dir)


def build_preview(output_dir: Path, seed: int = 0) -> Path:
    """A tiny random ``AutoencoderTiny`` (TAESD's architecture, x8 upsampling from SDXL's
    four latent channels) under ``output_dir``, standing in for madebyollin/taesdxl."""
    torch.manual_seed(seed)
    preview = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )
    preview.save_pretrained(Path(output_dir) / PREVIEW_SUBDIR)
    return Path(output_dir) / PREVIEW_SUBDIR


def build_ip_adapter(output_dir: Path, seed: int = 0) -> Path:
    """A tiny IP-Adapter folder for the tiny UNet under ``output_dir``, in h94/IP-Adapter's
    layout, with both SDXL variants (model_refs.IP_ADAPTER_VARIANTS), each a tiny
    ``CLIPVisionModelWithProjection`` as its image encoder and its weight file: the image
    projection ("sdxl": to four tokens; "plus-vit-h": a Resampler of the encoder's patch
    features) and a key and value projection for each cross-attention."""
    torch.manual_seed(seed + 2)
    root = Path(output_dir) / IP_ADAPTER_SUBDIR
    unet = UNet2DConditionModel.from_pretrained(Path(output_dir) / BASE_SUBDIR / "unet")
    context = unet.config.cross_attention_dim
    projections = {"sdxl": _image_projection(context), "plus-vit-h": _resampler(context)}
    for variant, files in IP_ADAPTER_VARIANTS.items():
        CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=IMAGE_HIDDEN_SIZE,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
                projection_dim=IMAGE_EMBED_DIM,
            )
        ).save_pretrained(root / files.encoder)
        weights = dict(projections[variant])
        # diffusers numbers the cross-attentions 1, 3, 5…, in the UNet's order of processors.
        cross_attentions = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
        for number, name in zip(
            range(1, 2 * len(cross_attentions), 2), cross_attentions, strict=True
        ):
            width = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
            for projection in ("to_k_ip", "to_v_ip"):
                weights[f"ip_adapter.{number}.{projection}.weight"] = (
                    torch.randn(width, context) * 0.3
                )
        (root / files.weight).parent.mkdir(parents=True, exist_ok=True)
        save_file(weights, root / files.weight)
    return root


def _image_projection(context: int) -> dict[str, torch.Tensor]:
    """ip-adapter_sdxl's projection of the pooled image embedding to four tokens."""
    return {
        "image_proj.proj.weight": torch.randn(4 * context, IMAGE_EMBED_DIM) * 0.3,
        "image_proj.proj.bias": torch.zeros(4 * context),
        "image_proj.norm.weight": torch.ones(context),
        "image_proj.norm.bias": torch.zeros(context),
    }


def _resampler(context: int, width: int = 64, tokens: int = 4) -> dict[str, torch.Tensor]:
    """ip-adapter-plus's Resampler, in its original key names: learned queries attending to
    the encoder's patch features through four blocks (diffusers reads one head per 64 of
    the query's width)."""
    weights = {
        "latents": torch.randn(1, tokens, width) / width**0.5,
        "proj_in.weight": torch.randn(width, IMAGE_HIDDEN_SIZE) * 0.3,
        "proj_in.bias": torch.zeros(width),
        "proj_out.weight": torch.randn(context, width) * 0.3,
        "proj_out.bias": torch.zeros(context),
        "norm_out.weight": torch.ones(context),
        "norm_out.bias": torch.zeros(context),
    }
    for block in range(4):
        attention, feed_forward = f"layers.{block}.0", f"layers.{block}.1"
        for norm in (f"{attention}.norm1", f"{attention}.norm2", f"{feed_forward}.0"):
            weights[f"{norm}.weight"], weights[f"{norm}.bias"] = (
                torch.ones(width),
                torch.zeros(width),
            )
        weights[f"{attention}.to_q.weight"] = torch.randn(width, width) * 0.3
        weights[f"{attention}.to_kv.weight"] = torch.randn(2 * width, width) * 0.3
        weights[f"{attention}.to_out.weight"] = torch.randn(width, width) * 0.3
        weights[f"{feed_forward}.1.weight"] = torch.randn(4 * width, width) * 0.3
        weights[f"{feed_forward}.3.weight"] = torch.randn(width, 4 * width) * 0.3
    return {f"image_proj.{key}": value for key, value in weights.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="directory to write the model to")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument(
        "--preview-only", action="store_true", help="add only the preview decoder to a built model"
    )
    parser.add_argument(
        "--ip-adapter-only", action="store_true", help="add only the IP-Adapter to a built model"
    )
    parser.add_argument(
        "--controls-only",
        action="store_true",
        help="add only the depth ControlNet and the ControlNet Union to a built model",
    )
    args = parser.parse_args()
    if args.preview_only:
        print(f"tiny preview decoder written to {build_preview(args.output_dir, args.seed)}")
        return
    if args.ip_adapter_only:
        print(f"tiny IP-Adapter written to {build_ip_adapter(args.output_dir, args.seed)}")
        return
    if args.controls_only:
        built = build_controls(args.output_dir, args.seed)
        print(f"tiny depth ControlNet and ControlNet Union written to {built}")
        return
    print(f"tiny SDXL ControlNet model written to {build(args.output_dir, args.seed)}")


if __name__ == "__main__":
    main()
