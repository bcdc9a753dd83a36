"""Where the tiny model's parts live in its folder: `devtools.tiny_model` writes them there,
and the test helpers point the Services at them. Apart from the builder, so that reading the
layout imports neither torch nor diffusers."""

# Where the three model paths live under the output directory; the service
# loads them exactly like the three Hugging Face repositories they stand in for.
BASE_SUBDIR = "base"
CONTROLNET_SUBDIR = "controlnet"
VAE_SUBDIR = "vae"
# The preview decoder (TAESD), built apart: a model built before it keeps its other parts.
PREVIEW_SUBDIR = "preview"
# A second ControlNet (standing in for a depth one) and a ControlNet Union, for
# SDXL_CONTROLNETS; built apart too.
DEPTH_SUBDIR = "controlnet-depth"
UNION_SUBDIR = "controlnet-union"
# An IP-Adapter folder in h94/IP-Adapter's layout (model_refs.IP_ADAPTER_VARIANTS), for
# SDXL_IP_ADAPTER; built apart too.
IP_ADAPTER_SUBDIR = "ip-adapter"
