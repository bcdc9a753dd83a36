"""Random-weight LoRA adapters for the tiny model, built offline with peft.

Each adapter is a directory holding ``pytorch_lora_weights.safetensors`` as diffusers'
``save_lora_weights`` writes it, the layout of a published SDXL LoRA. The weights are
random (and large enough to change every image), so tests can tell adapters apart.

    python -m devtools.tiny_lora models/tiny models/tiny-adapters
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from devtools.tiny_layout import BASE_SUBDIR

# Three adapters: two styles, and one that stands in for a few-step distilled LoRA.
ADAPTERS = {"style": 1, "detail": 2, "fast": 3}  # name: seed
# What the few-step adapter asks for, as SDXL-Lightning's 4-step LoRA does.
FAST_PRESET = {"scheduler": "euler_trailing", "num_inference_steps": 4, "guidance_scale": 0}
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def build_adapter(unet_dir: Path, output_dir: Path, seed: int, rank: int = 4) -> Path:
    """One random LoRA for the UNet in ``unet_dir``, saved under ``output_dir``."""
    # Imported here: the test processes read `declaration` and need none of them.
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    # Random A and B (peft's default leaves B zero: an adapter that changes nothing).
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGET_MODULES, init_lora_weights=False)
    )
    StableDiffusionXLPipeline.save_lora_weights(
        output_dir, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    return output_dir


def build(tiny_model: Path, output_dir: Path) -> dict[str, dict]:
    """Every adapter under ``output_dir``; returns their LORA_ADAPTERS declaration."""
    for name, seed in ADAPTERS.items():
        build_adapter(tiny_model / BASE_SUBDIR / "unet", output_dir / name, seed)
    return declaration(output_dir)


def declaration(output_dir: Path) -> dict[str, dict]:
    """The LORA_ADAPTERS value for adapters ``build`` wrote under ``output_dir``."""
    declared: dict[str, dict] = {
        name: {"model": str((output_dir / name).resolve())} for name in ADAPTERS
    }
    declared["fast"]["preset"] = FAST_PRESET
    return declared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tiny_model", type=Path, help="python -m devtools.tiny_model's output")
    parser.add_argument("output_dir", type=Path, help="directory to write the adapters to")
    args = parser.parse_args()
    build(args.tiny_model, args.output_dir)
    print(f"LORA_ADAPTERS='{json.dumps(declaration(args.output_dir))}'")


if __name__ == "__main__":
    main()
