"""Lay the tiny model out as the Hugging Face repositories it stands in for.

The real repositories hold more than a pipeline loads: fp32 weights next to their fp16
variant, ``.bin`` duplicates, ONNX and Flax exports, single-file checkpoints, another
model beside the one loaded, sample images. These copies hold the same kinds of files
(from ``models/tiny``, so small), which lets a test prove that the include patterns fetch
what the pipeline needs and nothing else.

    python -m devtools.hub_repos models/tiny OUT   # then: python -m devtools.hub ID=OUT/... ...
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from devtools.tiny_model import (
    BASE_SUBDIR,
    CONTROLNET_SUBDIR,
    DEPTH_SUBDIR,
    PREVIEW_SUBDIR,
    UNION_SUBDIR,
    VAE_SUBDIR,
)

BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
CONTROLNET_REPO = "diffusers/controlnet-canny-sdxl-1.0"
# The ControlNets SDXL_CONTROLNETS may declare besides: a second type, and a Union.
DEPTH_REPO = "diffusers/controlnet-depth-sdxl-1.0"
UNION_REPO = "xinsir/controlnet-union-sdxl-1.0"
VAE_REPO = "madebyollin/sdxl-vae-fp16-fix"
PREVIEW_REPO = "madebyollin/taesdxl"

# The weight file of each component, as diffusers and transformers name them.
BASE_WEIGHTS = {
    "text_encoder": "model",
    "text_encoder_2": "model",
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
}


def _half(weights: Path) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}


def _fp16_variant(weights: Path) -> Path:
    """Write ``name.fp16.safetensors`` next to ``name.safetensors``, really in fp16."""
    target = weights.with_suffix(".fp16.safetensors")
    save_file(_half(weights), target, metadata={"format": "pt"})
    return target


def _bin_copy(weights: Path, target: Path) -> None:
    """A pickled duplicate of ``weights``, like the ``.bin`` files older repositories keep."""
    torch.save(load_file(weights), target)


def _sample_image(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (200, 120, 40)).save(target)


def _text(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def base_repo(tiny: Path, out: Path) -> Path:
    """Like stabilityai/stable-diffusion-xl-base-1.0: each component in fp32 and fp16, the
    UNet also as ONNX and OpenVINO exports, the whole model as one checkpoint at the root."""
    shutil.copytree(tiny / BASE_SUBDIR, out)
    for component, name in BASE_WEIGHTS.items():
        weights = out / component / f"{name}.safetensors"
        _fp16_variant(weights)
        _bin_copy(weights, out / component / "openvino_model.bin")
    (out / "unet" / "diffusion_flax_model.msgpack").write_bytes(b"flax export stand-in")
    (out / "text_encoder" / "model.onnx").write_bytes(b"onnx export stand-in")
    (out / "unet" / "model.onnx").write_bytes(b"onnx export stand-in")
    (out / "unet" / "model.onnx_data").write_bytes(b"onnx weights stand-in")
    # The single-file checkpoint for other UIs: a "*.safetensors" pattern would fetch it too.
    shutil.copyfile(weights, out / "sd_xl_base_1.0.safetensors")
    _sample_image(out / "01.png")
    _text(out / "README.md", "# SDXL base 1.0 (tiny stand-in)\n")
    _text(out / ".gitattributes", "*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    return out


def controlnet_repo(tiny: Path, out: Path, subdir: str = CONTROLNET_SUBDIR) -> Path:
    """Like diffusers/controlnet-canny-sdxl-1.0 (and its depth sibling, from ``subdir``):
    fp32 and fp16 weights, each also as .bin."""
    shutil.copytree(tiny / subdir, out)
    weights = out / "diffusion_pytorch_model.safetensors"
    fp16 = _fp16_variant(weights)
    _bin_copy(weights, out / "diffusion_pytorch_model.bin")
    _bin_copy(fp16, out / "diffusion_pytorch_model.fp16.bin")
    _sample_image(out / "out_hug_lab_7.png")
    _text(out / "README.md", f"# ControlNet SDXL 1.0 from {subdir} (tiny stand-in)\n")
    return out


def union_repo(tiny: Path, out: Path) -> Path:
    """Like xinsir/controlnet-union-sdxl-1.0: fp16 weights under the plain file name, and
    beside them the ProMax model (two more control types: a wider task embedding) as
    ``config_promax.json`` and ``diffusion_pytorch_model_promax.safetensors``."""
    shutil.copytree(tiny / UNION_SUBDIR, out)
    weights = out / "diffusion_pytorch_model.safetensors"
    tensors = _half(weights)
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    extra = 2  # ProMax adds tile and inpainting
    config["num_control_type"] += extra
    (out / "config_promax.json").write_text(json.dumps(config, indent=2))
    embedding = tensors["task_embedding"]
    tensors["task_embedding"] = torch.cat([embedding, embedding[:extra]])
    # Its control-type embedding takes addition_time_embed_dim inputs per type.
    projection = tensors["control_add_embedding.linear_1.weight"]
    widened = projection[:, : extra * config["addition_time_embed_dim"]]
    tensors["control_add_embedding.linear_1.weight"] = torch.cat([projection, widened], dim=1)
    save_file(tensors, out / "diffusion_pytorch_model_promax.safetensors", {"format": "pt"})
    _sample_image(out / "images" / "000000_canny_concat.webp")
    _text(out / "README.md", "# ControlNet Union SDXL 1.0 (tiny stand-in)\n")
    return out


def vae_repo(tiny: Path, out: Path) -> Path:
    """Like madebyollin/sdxl-vae-fp16-fix: one fp32 diffusers file (no fp16 variant: the
    fix is in the weights), a .bin duplicate, single-file copies and comparison images."""
    shutil.copytree(tiny / VAE_SUBDIR, out)
    weights = out / "diffusion_pytorch_model.safetensors"
    _bin_copy(weights, out / "diffusion_pytorch_model.bin")
    shutil.copyfile(weights, out / "sdxl_vae.safetensors")
    shutil.copyfile(weights, out / "sdxl.vae.safetensors")
    _sample_image(out / "images" / "vae-comparison.png")
    _text(out / "README.md", "# SDXL VAE fp16 fix (tiny stand-in)\n")
    return out


def preview_repo(tiny: Path, out: Path) -> Path:
    """Like madebyollin/taesdxl: the diffusers files, a .bin duplicate, the original
    project's encoder and decoder as .pth files, and sample images."""
    shutil.copytree(tiny / PREVIEW_SUBDIR, out)
    weights = out / "diffusion_pytorch_model.safetensors"
    _bin_copy(weights, out / "diffusion_pytorch_model.bin")
    for part in ("encoder", "decoder"):
        _bin_copy(weights, out / f"taesdxl_{part}.pth")
    _sample_image(out / "images" / "preview.png")
    _text(out / "README.md", "# TAESD for SDXL (tiny stand-in)\n")
    return out


def lay_out(tiny: Path, out: Path) -> dict[str, Path]:
    """The repositories under ``out``, by repository id, ready for ``devtools.hub.Hub``."""
    out.mkdir(parents=True, exist_ok=True)
    return {
        BASE_REPO: base_repo(tiny, out / "base"),
        CONTROLNET_REPO: controlnet_repo(tiny, out / "controlnet"),
        DEPTH_REPO: controlnet_repo(tiny, out / "controlnet-depth", DEPTH_SUBDIR),
        UNION_REPO: union_repo(tiny, out / "controlnet-union"),
        VAE_REPO: vae_repo(tiny, out / "vae"),
        PREVIEW_REPO: preview_repo(tiny, out / "preview"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tiny", type=Path, help="python -m devtools.tiny_model's output")
    parser.add_argument("out", type=Path, help="an empty directory for the repositories")
    args = parser.parse_args()
    repos = lay_out(args.tiny, args.out)
    print("python -m devtools.hub " + " ".join(f"{rid}={path}" for rid, path in repos.items()))


if __name__ == "__main__":
    main()
