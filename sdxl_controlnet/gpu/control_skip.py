"""No ControlNet forward where it adds nothing. diffusers calls the ControlNet at every step
and multiplies its residuals by the step's scale: outside control_guidance_start/end, or at
controlnet_conditioning_scale 0, that scale is 0 and the residuals are zeros, which the UNet
adds to its own. Returning no residuals instead skips the ControlNet and those additions,
and the image is the same to the byte (x + 0 is x)."""

from __future__ import annotations

import functools

import torch
from diffusers.models import MultiControlNetModel

# What the pipelines unpack as (down residuals, mid residual): none, as without a ControlNet.
NOTHING = (None, None)


def adds_nothing(kwargs: dict) -> bool:
    """Whether a ControlNet call's residuals are all zeros: its scale is a Python 0 (a
    compiled call's scale is a tensor by then, and is never skipped there). Guess mode
    pads the residuals for guidance, so it always runs."""
    scale = kwargs.get("conditioning_scale")
    return isinstance(scale, int | float) and scale == 0 and not kwargs.get("guess_mode")


def skip_when_unscaled(controlnet: torch.nn.Module) -> None:
    """From now on, ``controlnet`` returns no residuals instead of zeros."""
    forward = controlnet.forward

    @functools.wraps(forward)
    def skipping(*args: object, **kwargs: object) -> object:
        return NOTHING if adds_nothing(kwargs) else forward(*args, **kwargs)

    controlnet.forward = skipping


class Combined(MultiControlNetModel):
    """diffusers' MultiControlNetModel, leaving out of the sum each ControlNet that adds
    nothing: theirs adds what each returns, and a skipped one returns no residuals."""

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: list[torch.Tensor],
        conditioning_scale: list[float],
        **kwargs: object,
    ) -> tuple:
        down, mid = NOTHING
        for image, scale, net in zip(controlnet_cond, conditioning_scale, self.nets, strict=True):
            net_down, net_mid = net(
                sample=sample,
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=image,
                conditioning_scale=scale,
                **kwargs,
            )
            if net_down is None:
                continue
            if down is None:
                down, mid = net_down, net_mid
            else:
                down = [total + residual for total, residual in zip(down, net_down, strict=True)]
                mid = mid + net_mid
        return down, mid
