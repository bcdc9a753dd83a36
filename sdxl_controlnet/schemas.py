"""Request models: every parameter with its default, bounds and description,
so validation and the OpenAPI schema come from one declaration."""

from __future__ import annotations

import secrets
import typing as t
from dataclasses import dataclass

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    ValidationError,
    field_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from . import outbound
from .controls import DERIVED, IMAGE_PROMPT, ControlType, RequestControlType
from .errors import InvalidRequest
from .settings import Scheduler, SettingsError, check_webhook_secret, settings
from .streaming import PREVIEW_MAX_SIDE

MAX_SEED = 2**32 - 1
EdgeMap = np.ndarray[t.Any, np.dtype[np.uint8]]  # H×W, one channel
Images = np.ndarray[t.Any, np.dtype[np.uint8]]  # N×H×W×3 RGB
Picture = np.ndarray[t.Any, np.dtype[np.uint8]]  # H×W×3 RGB, a picture to start from
Mask = np.ndarray[t.Any, np.dtype[np.uint8]]  # H×W, white where to repaint
ControlImages = np.ndarray[t.Any, np.dtype[np.uint8]]  # K×H×W×3, one per params.controls
# BentoML 1.4.40 finds an array inside typing.Optional, not inside `X | None`
# (_bentoml_sdk._pydantic.patch_annotation), so optional arrays are declared so.
OptionalPicture = t.Optional[Picture]  # noqa: UP045
OptionalMask = t.Optional[Mask]  # noqa: UP045
OptionalEdgeMap = t.Optional[EdgeMap]  # noqa: UP045
OptionalControlImages = t.Optional[ControlImages]  # noqa: UP045
__all__ = ["Scheduler"]  # re-exported: declared in settings, where adapter presets name one
# The serialization context under which a control keeps its data URI whole.
WHOLE_IMAGES = "whole_images"
ResizeMode = t.Literal["resize", "crop_and_resize", "resize_and_fill"]
OutputFormat = t.Literal["png", "jpeg", "webp"]
Preprocessor = t.Literal["canny", "none"]
# What a control's image is made with: derived here (controls.DERIVED), taken as it is
# (none), or a type that needs a model of its own, named to be told so.
ControlPreprocessor = t.Literal[ControlType, "none"]
# From noise; from a start picture; repainting where a mask is white.
Mode = t.Literal["text-to-image", "image-to-image", "inpainting"]
CONTROL_SCALE, MAX_CONTROL_SCALE = 0.5, 2.0  # every control's, the one or each of several
IMAGE_TO_IMAGE_STRENGTH = 0.8  # diffusers' default, as A1111's and Replicate's are near it
INPAINTING_STRENGTH = 1.0  # the masked area repainted from noise
MAX_MASK_BLUR = 64  # pixels: a feather wider than that is a blurred picture, not an edge


def _null_means_absent(cls: type[BaseModel], data: t.Any) -> t.Any:
    """``null`` for an optional field means "not given": the original contract declared
    ``negative_prompt: Optional[str]``, and clients written for it send ``null``."""
    if not isinstance(data, dict):
        return data
    optional = {name for name, field in cls.model_fields.items() if not field.is_required()}
    return {key: value for key, value in data.items() if value is not None or key not in optional}


def _too_few_steps(params: GenerationParams) -> str:
    return (
        f"strength × num_inference_steps must make at least one step; "
        f"{params.strength} × {params.num_inference_steps} makes none"
    )


def _rule(message: str) -> PydanticCustomError:
    """A broken rule between fields, reported as the sentence itself (no "Value error,")."""
    return PydanticCustomError("rule", message)


def _declared_adapter(name: str) -> str:
    if name not in settings.lora_adapters:
        available = ", ".join(sorted(settings.lora_adapters)) or "none (LORA_ADAPTERS is empty)"
        raise PydanticCustomError(
            "unknown_adapter",
            "unknown adapter '{name}'; this server has: {available}",
            {"name": name, "available": available},
        )
    return name


# The declared names reach the OpenAPI schema (and the studio) as an enum.
_ADAPTER_NAMES = sorted(settings.lora_adapters)
AdapterName = t.Annotated[
    str,
    AfterValidator(_declared_adapter),
    Field(json_schema_extra={"enum": _ADAPTER_NAMES} if _ADAPTER_NAMES else None),
]
# Scale 1 is the adapter as trained, 0 the base model. Negative scales invert an adapter
# trained as a slider (more or less of a concept); past ±2 the adapter's change outweighs
# the weights it modifies and images fall apart.
MAX_LORA_SCALE = 2.0


class LoraChoice(BaseModel):
    """One adapter of a request, and how strongly it applies."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: AdapterName = Field(description="An adapter this server declares (LORA_ADAPTERS).")
    scale: float = Field(
        default=1.0,
        ge=-MAX_LORA_SCALE,
        le=MAX_LORA_SCALE,
        description="1 applies the adapter as trained; 0 leaves the base model.",
    )


def _offered_type(kind: str) -> str:
    if kind not in settings.control_types:
        raise PydanticCustomError(
            "unknown_control_type",
            "this server's ControlNets do not serve '{kind}'; they serve: {offered}",
            {"kind": kind, "offered": ", ".join(settings.control_types)},
        )
    return kind


# The types this server serves reach the OpenAPI schema (and the studio) as the enum:
# image_prompt only where an IP-Adapter is loaded.
OfferedType = t.Annotated[
    RequestControlType,
    AfterValidator(_offered_type),
    Field(json_schema_extra={"enum": settings.control_types}),
]


class ControlSettings(BaseModel):
    """One control as the GPU Service takes it: its type, and how strongly and when it steers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: OfferedType = Field(description="What the control image shows.")
    scale: float = Field(
        default=CONTROL_SCALE, ge=0.0, le=MAX_CONTROL_SCALE, description="How strongly it steers."
    )
    start: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Fraction of the steps at which it starts."
    )
    end: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Fraction of the steps at which it stops."
    )

    @model_validator(mode="after")
    def _window(self) -> t.Self:
        if self.start >= self.end:
            raise _rule("start must be less than end")
        return self


class Control(ControlSettings):
    """One control of a request: its image, given or derived from the upload, and its settings."""

    image: str | None = Field(
        default=None,
        description="Its control image, as an https:// URL, a data:image/…;base64, URI or, "
        "in a form, the name of a file part of the request; left out, it is made from the "
        "upload by `preprocessor`.",
    )
    preprocessor: ControlPreprocessor | None = Field(
        default=None,
        description="How the control image is made: `canny` (edges, with `low_threshold` and "
        "`high_threshold`) and `tile` (the picture itself, blurred) are derived here; "
        "`none` takes the image as it is. Defaults to the type where it is derived here, "
        "else `none`. Other types need a model of their own: send their image.",
    )

    @field_serializer("image", when_used="json")
    def _abbreviated(self, image: str | None, info: SerializationInfo) -> str | None:
        # Echoed whole, a data URI would send the picture back with every result and webhook;
        # a job's stored input (context WHOLE_IMAGES) keeps it.
        whole = (info.context or {}).get(WHOLE_IMAGES, False)
        if whole or image is None or not image.startswith("data:") or "," not in image:
            return image
        return f"{image[: image.index(',') + 1]}… ({len(image)} characters)"

    @model_validator(mode="after")
    def _derivable(self) -> t.Self:
        if self.type == IMAGE_PROMPT and self.preprocessor not in (None, "none"):
            raise _rule("preprocessor: an image_prompt takes its picture as it is; leave it out")
        if self.preprocessor not in (None, "none", *DERIVED):
            raise _rule(
                f"preprocessor: deriving a {self.preprocessor} image needs a model of its own, "
                f"which this server does not run; make it yourself and send it as image (or "
                f"as the upload, with preprocessor none)"
            )
        return self

    @property
    def made_by(self) -> str:
        """The preprocessor that makes this control's image, defaults resolved."""
        if self.preprocessor is not None:
            return self.preprocessor
        return self.type if self.type in DERIVED else "none"


class GenerationParams(BaseModel):
    """What the GPU Service needs to generate from an edge map."""

    # Unknown fields are typos a user wants to hear about; NaN and inf are never valid.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(
        min_length=1, max_length=settings.max_prompt_chars, description="What to draw."
    )
    prompt_2: str | None = Field(
        default=None,
        max_length=settings.max_prompt_chars,
        description="Prompt for SDXL's second text encoder; defaults to `prompt`.",
    )
    negative_prompt: str = Field(
        default="", max_length=settings.max_prompt_chars, description="What to avoid."
    )
    negative_prompt_2: str | None = Field(
        default=None,
        max_length=settings.max_prompt_chars,
        description="Negative prompt for the second text encoder; defaults to `negative_prompt`.",
    )
    controlnet_conditioning_scale: float = Field(
        default=CONTROL_SCALE,
        ge=0.0,
        le=MAX_CONTROL_SCALE,
        description="How strongly the edge map steers the image.",
    )
    control_guidance_start: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Fraction of the steps at which ControlNet starts."
    )
    control_guidance_end: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Fraction of the steps at which ControlNet stops."
    )
    guess_mode: bool = Field(
        default=False, description="Let ControlNet recognise the content even without a prompt."
    )
    controls: list[ControlSettings] = Field(
        default_factory=list,
        max_length=settings.max_controls,
        description="Several controls, each with its own image, scale and window; left out, "
        "one Canny control steered by `controlnet_conditioning_scale` and "
        "`control_guidance_start`/`end`.",
    )
    num_inference_steps: int = Field(
        default=25, ge=1, le=settings.max_steps, description="Denoising steps."
    )
    guidance_scale: float = Field(
        default=5.0,
        ge=0.0,
        le=30.0,
        description="Classifier-free guidance; 1 or less turns it off.",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Seed for reproducible images; a random one is drawn when absent. "
        "Image i of a batch uses seed + i.",
    )
    scheduler: Scheduler = Field(default="euler", description="Sampler.")
    strength: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="With a start picture (`init_image`, or `image` itself): how far to move "
        f"from it, 1 repainting it entirely. Defaults to {IMAGE_TO_IMAGE_STRENGTH} for "
        f"image-to-image and {INPAINTING_STRENGTH} for inpainting; only strength × "
        "num_inference_steps steps run.",
        json_schema_extra={
            "x-default-by-mode": {
                "image-to-image": IMAGE_TO_IMAGE_STRENGTH,
                "inpainting": INPAINTING_STRENGTH,
            }
        },
    )
    num_images: int = Field(
        default=1, ge=1, le=settings.max_images, description="Images to generate."
    )
    loras: list[LoraChoice] = Field(
        default_factory=list,
        max_length=max(1, len(settings.lora_adapters)),
        description="LoRA adapters to apply, combined; none gives the base model. An adapter "
        "with a preset (a few-step LoRA) sets `scheduler`, `num_inference_steps` and "
        "`guidance_scale` where the request does not.",
        json_schema_extra={
            "x-presets": {n: a.preset.values() for n, a in settings.lora_adapters.items()}
        },
    )

    preview_every: int = Field(
        default=0,
        ge=0,
        le=settings.max_steps,
        description="Every this many steps, a preview of the first image as it forms: a WebP "
        f"of at most {PREVIEW_MAX_SIDE} px on its long side, sent as a `preview` event by "
        "/generate_stream and kept in a job's /status. 0 sends none; none comes after the "
        "last step, which the result follows.",
        # Whether this server makes previews (SDXL_PREVIEW_MODEL), for clients such as the studio.
        json_schema_extra={"x-available": bool(settings.sdxl_preview_model)},
    )

    _null_means_absent = model_validator(mode="before")(classmethod(_null_means_absent))

    @property
    def steps(self) -> int:
        """The denoising steps that run: from a start picture, diffusers skips the first
        (1 - strength) of them."""
        steps = self.num_inference_steps
        return steps if self.strength is None else min(int(steps * self.strength), steps)

    @property
    def batch(self) -> int:
        """The models' batch: diffusers guides (guidance_scale > 1) by denoising each image
        twice, with and without the prompt."""
        return self.num_images * (2 if self.guidance_scale > 1 else 1)

    @model_validator(mode="after")
    def _adapters_and_their_presets(self) -> t.Self:
        names = [lora.name for lora in self.loras]
        if len(set(names)) < len(names):
            raise _rule("loras: name each adapter at most once")
        chosen: dict[str, tuple[str, t.Any]] = {}  # field: (adapter, value)
        for name in names:
            for field, value in settings.lora_adapters[name].preset.values().items():
                if field in self.model_fields_set:
                    continue  # the client's own value wins
                if field in chosen and chosen[field][1] != value:
                    raise _rule(
                        f"loras: the presets of {chosen[field][0]} and {name} disagree on "
                        f"{field} ({chosen[field][1]} and {value}); set {field} in the request"
                    )
                chosen[field] = (name, value)
        for field, (_, value) in chosen.items():
            setattr(self, field, value)
        return self

    @model_validator(mode="after")
    def _previews_available(self) -> t.Self:
        if self.preview_every and not settings.sdxl_preview_model:
            raise _rule(
                "preview_every: this server makes no previews (its SDXL_PREVIEW_MODEL is "
                "empty); send 0 or leave it out"
            )
        return self

    @model_validator(mode="after")
    def _one_control_or_several(self) -> t.Self:
        # Set to other than their defaults: a round trip through model_dump sets them all.
        one_control = ("controlnet_conditioning_scale", "control_guidance_start")
        one_control += ("control_guidance_end", "preprocessor")
        fields = type(self).model_fields
        given = [
            name
            for name in one_control
            if name in fields and getattr(self, name) != fields[name].default
        ]
        if self.controls and given:
            raise _rule(
                f"{given[0]}: with controls, each control has its own scale, start, end and "
                "preprocessor; leave the one-control fields out"
            )
        kinds = [control.type for control in self.controls]
        if kinds.count(IMAGE_PROMPT) > 1:
            raise _rule("controls: at most one image_prompt per request")
        if kinds and set(kinds) == {IMAGE_PROMPT}:
            raise _rule(
                "controls: an image_prompt goes beside at least one ControlNet control "
                f"({', '.join(k for k in settings.control_types if k != IMAGE_PROMPT)})"
            )
        if not self.controls and "canny" not in settings.control_types:
            raise _rule(
                "controls: this server's ControlNets serve "
                f"{', '.join(settings.control_types)}, not the one Canny control a request "
                "without controls asks for; send controls"
            )
        return self

    @model_validator(mode="after")
    def _guidance_window_steps_and_seed(self) -> t.Self:
        if self.control_guidance_start >= self.control_guidance_end:
            raise _rule("control_guidance_start must be less than control_guidance_end")
        if self.steps < 1:
            raise _rule(_too_few_steps(self))
        # The seed is resolved once, here, so that every later stage reports the same one.
        if self.seed is None:
            self.seed = secrets.randbelow(MAX_SEED + 1)
        return self


class EdgeParams(BaseModel):
    """How the control image is made from the input, and at what size."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    preprocessor: Preprocessor = Field(
        default="canny",
        description="`canny` detects the edges of the upload; `none` takes the upload as the "
        "control image itself (white edges on black), only sized and made one-channel.",
    )
    low_threshold: int = Field(default=100, ge=1, le=255, description="Canny lower threshold.")
    high_threshold: int = Field(default=200, ge=1, le=255, description="Canny upper threshold.")
    width: int | None = Field(
        default=None,
        ge=settings.min_output_side,
        multiple_of=8,
        description="Output width; with `height`, or the input's size snapped to multiples of 8.",
    )
    height: int | None = Field(
        default=None,
        ge=settings.min_output_side,
        multiple_of=8,
        description="Output height; with `width`.",
    )
    resize_mode: ResizeMode = Field(
        default="crop_and_resize",
        description="How the input meets width×height: stretch, cover and crop, or fit and pad.",
    )

    _null_means_absent = model_validator(mode="before")(classmethod(_null_means_absent))

    @model_validator(mode="after")
    def _thresholds_and_size(self) -> t.Self:
        if self.low_threshold > self.high_threshold:
            raise _rule("low_threshold must not exceed high_threshold")
        if (self.width is None) != (self.height is None):
            raise _rule("give both width and height, or neither")
        if self.width and self.height and self.width * self.height > settings.max_output_pixels:
            raise _rule(f"width × height must be at most {settings.max_output_pixels} pixels")
        return self

    @property
    def size(self) -> tuple[int, int] | None:
        return (self.width, self.height) if self.width and self.height else None


class Params(GenerationParams, EdgeParams):
    """The public request: generation settings, edge detection, size and output."""

    controls: list[Control] = Field(  # type: ignore[assignment]  # the public form of each
        default_factory=list,
        max_length=settings.max_controls,
        description="Several controls, each with its own image (given, or made from the "
        "upload), type, scale and window; left out, one Canny control of the upload steered by "
        "`preprocessor`, `controlnet_conditioning_scale` and `control_guidance_start`/`end`. "
        "See docs/api.md.",
    )
    output_format: OutputFormat = Field(default="png", description="Image format returned.")
    keep_unmasked: bool = Field(
        default=True,
        description="Inpainting: the pixels outside the mask and its `mask_blur` edge come "
        "back as the start picture's (sized to the output), byte for byte in PNG. `false` "
        "returns the whole picture as the VAE decoded it, colours shifted a little everywhere.",
    )
    mask_blur: int = Field(
        default=4,
        ge=0,
        le=MAX_MASK_BLUR,
        description="Inpainting with `keep_unmasked`: the width in pixels, on each side of the "
        "mask's edge, over which the repaint fades into the start picture; 0 for a hard edge.",
    )
    mode: Mode | None = Field(
        default=None,
        description="Set by the server from what the request sends: `inpainting` with a "
        "`mask`, `image-to-image` with an `init_image` or a `strength`, else `text-to-image`. "
        "A request that names it has it checked.",
    )

    @model_validator(mode="before")
    @classmethod
    def _webhooks_only_for_jobs(cls, data: t.Any) -> t.Any:
        jobs_only = set(TaskParams.model_fields) - cls.model_fields.keys()
        if isinstance(data, dict) and (given := sorted(jobs_only & data.keys())):
            raise _rule(f"{given[0]}: only jobs deliver webhooks; submit to /generate_task/submit")
        return data

    def with_mode(self, init_image: bool, mask: bool) -> Params:
        """These settings with the mode that the files sent make, and its strength."""
        if mask:
            mode, strength = "inpainting", INPAINTING_STRENGTH
        elif init_image or self.strength is not None:
            mode, strength = "image-to-image", IMAGE_TO_IMAGE_STRENGTH
        else:
            mode, strength = "text-to-image", None
        if self.mode not in (None, mode):
            raise InvalidRequest(f"params.mode: the files sent make {mode}, not {self.mode}")
        resolved = self.model_copy(update={"mode": mode, "strength": self.strength or strength})
        if resolved.steps < 1:  # a default strength may leave none
            raise InvalidRequest(_too_few_steps(resolved))
        return resolved

    def generation_params(self) -> GenerationParams:
        """The part the GPU Service takes, with the seed resolved."""
        fields = self.model_dump(
            include=set(GenerationParams.model_fields),
            exclude={"controls": {"__all__": {"image", "preprocessor"}}},
        )
        return GenerationParams(**fields)


WebhookEvent = t.Literal["start", "progress", "completed", "failed", "canceled"]


def _whsec(value: SecretStr | None) -> SecretStr | None:
    if value is not None:
        check_webhook_secret(value.get_secret_value())
    return value


class TaskParams(Params):
    """A job's request: the generation's parameters, and where and how its outcome is
    delivered. A webhook this server may not call (its outbound policy) is refused at
    submit, not when the job ends."""

    webhook: str | None = Field(
        default=None,
        max_length=2048,
        description="An https URL the server POSTs the job's outcome to, signed per Standard "
        "Webhooks; under the server's WEBHOOK_ALLOW rules.",
    )
    webhook_events: list[WebhookEvent] = Field(
        default_factory=lambda: ["completed", "failed", "canceled"],
        min_length=1,
        description="Which of the job's events are delivered: `start` (each run), `progress` "
        "(at most one every 2 s while it denoises) and its endings; by default its endings.",
    )
    webhook_secret: t.Annotated[SecretStr | None, AfterValidator(_whsec)] = Field(
        default=None,
        exclude=True,
        description="The key that signs this job's webhooks (whsec_ and 24 to 64 bytes in "
        "base64); the server's own WEBHOOK_SECRET if not given. Never echoed, logged or kept "
        "with the result.",
    )
    webhook_payload: t.Literal["full", "thin"] = Field(
        default="full",
        description="`thin` delivers the outcome without the images, for receivers that cap "
        "their bodies: fetch them from /generate_task/get.",
    )

    @model_validator(mode="after")
    def _deliverable(self) -> t.Self:
        if self.webhook is None:
            if self.webhook_secret is not None:
                raise _rule("webhook_secret: only with a webhook")
            return self
        if self.webhook_secret is None and not settings.webhook_secret:
            raise _rule(
                "webhook: this server has no WEBHOOK_SECRET to sign it with; send "
                "params.webhook_secret, or poll /generate_task/status instead"
            )
        try:
            outbound.WEBHOOK_POLICY.check_url(self.webhook)
        except outbound.Refused as exc:
            raise _rule(f"webhook: {exc.reason}") from None
        return self


class GeneratedImage(BaseModel):
    image: str = Field(description="The image, base64-encoded in `format`.")
    seed: int = Field(description="The seed this image's noise was drawn from: the request's + i.")


class BatchResult(BaseModel):
    """Several images, the edge map that steered them, and how they were made."""

    images: list[GeneratedImage]
    edge_map: str = Field(description="The control image the GPU received, base64-encoded PNG.")
    params: Params = Field(description="Every setting used; seed, width and height resolved.")
    timings_ms: dict[str, float] = Field(
        description="Milliseconds spent in preprocess, generate, keep_unmasked (inpainting) "
        "and encode."
    )


def _check_presets() -> None:
    """Hold each adapter's preset to the request's own bounds, at start-up."""
    for name, adapter in settings.lora_adapters.items():
        try:
            GenerationParams(prompt="preset", **adapter.preset.values())
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
            )
            raise SettingsError(
                f"invalid configuration: LORA_ADAPTERS: {name}.preset: {problems}"
            ) from None


_check_presets()


@dataclass(frozen=True)
class GPURequest:
    """One generation, from the front's preprocessing through the GPU Service's API to the
    pipeline's call: its settings and its pictures, at the output size (H×W)."""

    params: GenerationParams
    # K×H×W×C uint8: one control image per params.controls (C = 3), or without them the one
    # Canny edge map (K = 1, C = 1). None where the caller sent neither.
    controls: np.ndarray | None
    init_image: np.ndarray | None = None  # H×W×3 uint8, the picture to start from
    mask: np.ndarray | None = None  # H×W uint8, white where to repaint

    @classmethod
    def of(
        cls,
        params: GenerationParams,
        edges: np.ndarray | None = None,
        controls: np.ndarray | None = None,
        init_image: np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> GPURequest:
        """The request the GPU Service's fields make: ``edges`` (H×W, the one Canny control,
        one channel on the wire) or ``controls`` (K×H×W×3). Never raises: ``checked`` says
        what is wrong, where a stream can still answer it."""
        if edges is not None:
            one = edges[None, :, :, None] if edges.ndim == 2 else edges
            controls = one if controls is None else None  # both: ``checked`` refuses
        return cls(params, controls, init_image, mask)

    @property
    def edges(self) -> np.ndarray | None:
        """The one Canny control as the wire carries it (H×W); None with params.controls."""
        if self.controls is None or self.params.controls:
            return None
        return self.controls[0, :, :, 0]

    def arguments(self) -> dict[str, t.Any]:
        """As the keyword arguments of the GPU Service's APIs, which ``of`` reads back."""
        edges = self.edges
        return {
            "params": self.params,
            "edges": edges,
            "controls": self.controls if edges is None else None,
            "init_image": self.init_image,
            "mask": self.mask,
        }

    def first_control(self) -> np.ndarray:
        """The control image that steers first: the one Canny map (H×W), or the first
        ControlNet's (H×W×3; an image prompt is no control image, and never the only one)."""
        assert self.controls is not None, "a request with its control images"
        if not self.params.controls:
            return self.edges
        types = [control.type for control in self.params.controls]
        steering = [i for i, type_ in enumerate(types) if type_ != IMAGE_PROMPT]
        return self.controls[steering[0]]

    @property
    def size(self) -> tuple[int, int]:
        """The output's (height, width)."""
        assert self.controls is not None, "a checked request"
        return self.controls.shape[1], self.controls.shape[2]

    def checked(self) -> GPURequest:
        """The GPU Service can be called directly: this request held to the front's limits,
        and a batch to the GPU memory budget, before anything is generated."""
        params, controls = self.params, self.controls
        if controls is None:
            raise InvalidRequest(
                "send edges (an H×W array, the one Canny control) or controls (K×H×W×3, one "
                "per params.controls): one of the two"
            )
        if params.controls:
            if controls.ndim != 4 or controls.shape[-1] != 3:
                raise InvalidRequest(
                    "params.controls goes with controls, a K×H×W×3 array, not edges"
                )
        elif controls.ndim != 4 or controls.shape[-1] != 1:
            raise InvalidRequest(
                "edges, a one-channel H×W array, is the one control; send controls with "
                "params.controls"
            )
        height, width = self.size
        # As the caller sent them: the one Canny control as edges, H×W.
        sent = ("controls", controls) if params.controls else ("edges", self.edges)
        for name, array, shape in (
            ("init_image", self.init_image, (height, width, 3)),
            ("mask", self.mask, (height, width)),
            (
                *sent,
                (len(params.controls), height, width, 3) if params.controls else (height, width),
            ),
        ):
            if array is not None and (array.shape != shape or array.dtype != np.uint8):
                raise InvalidRequest(
                    f"{name} must be a uint8 array of shape {shape}, for this output size; "
                    f"got {array.dtype} {array.shape}"
                )
        if (self.init_image is None) != (params.strength is None):
            raise InvalidRequest("strength and init_image go together: give both or neither")
        if self.mask is not None and self.init_image is None:
            raise InvalidRequest("mask needs init_image, the picture to repaint")
        if height % 8 or width % 8 or min(height, width) < settings.min_output_side:
            raise InvalidRequest(
                f"the control image is {width}×{height}; both sides must be multiples of 8 "
                f"and at least {settings.min_output_side}"
            )
        if height * width > settings.max_output_pixels:
            raise InvalidRequest(
                f"the control image is {width}×{height}; at most "
                f"{settings.max_output_pixels} pixels"
            )
        if height * width * params.num_images > settings.max_batch_pixels:
            raise InvalidRequest(
                f"{params.num_images} images at {width}×{height} exceed this server's GPU "
                f"memory budget of {settings.max_batch_pixels} pixels per request "
                "(MAX_BATCH_PIXELS); ask for fewer images or a smaller size"
            )
        return self
