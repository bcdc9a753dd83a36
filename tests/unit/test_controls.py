"""Several controls: what SDXL_CONTROLNETS declares, the request rules around
``params.controls``, and the control images the front makes for them."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError

from devtools.harness import encode, photo, shapes_image
from sdxl_controlnet.controls import CONTROL_TYPES, UNION_MODES, offered, parse_controlnets
from sdxl_controlnet.errors import InvalidRequest
from sdxl_controlnet.front import preprocessing, references
from sdxl_controlnet.schemas import Control, GPURequest, Params
from sdxl_controlnet.settings import Settings, SettingsError

PROMPT = {"prompt": "a red ball", "seed": 1}


def test_no_declaration_is_the_one_canny_controlnet() -> None:
    assert parse_controlnets("", "org/canny@abc") == {"canny": "org/canny@abc"}
    assert parse_controlnets(" canny = a , depth=/models/d ", "x") == {
        "canny": "a",
        "depth": "/models/d",
    }


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("canny", "is not name=reference"),
        ("canny=", "is not name=reference"),
        ("edges=a", "the name must be a control type"),
        ("canny=a,canny=b", "'canny' is declared twice"),
        ("union=a,depth=b", "serves every type alone"),
    ],
)
def test_a_declaration_that_is_not_name_reference_pairs_stops_start_up(value, said) -> None:
    with pytest.raises(SettingsError, match=f"SDXL_CONTROLNETS=.*{said}"):
        Settings.from_env({"SDXL_CONTROLNETS": value})


def test_compiling_is_for_the_one_canny_controlnet() -> None:
    compiled = {"TORCH_COMPILE": "1"}
    assert Settings.from_env({**compiled, "SDXL_CONTROLNETS": "canny=a"}).compile_sizes
    with pytest.raises(SettingsError, match="TORCH_COMPILE compiles the one Canny ControlNet"):
        Settings.from_env({**compiled, "SDXL_CONTROLNETS": "canny=a,depth=b"})


def test_an_ip_adapter_offers_image_prompts_and_is_kept_from_compiling_and_fusing() -> None:
    adapter = {"SDXL_IP_ADAPTER": "/models/ip-adapter"}
    assert Settings.from_env(adapter).control_types == ["canny", "image_prompt"]
    for option in ("TORCH_COMPILE", "FUSE_QKV"):
        with pytest.raises(SettingsError, match="SDXL_IP_ADAPTER cannot be combined"):
            Settings.from_env({**adapter, option: "1"})


def test_the_types_offered_are_the_names_or_what_the_union_serves() -> None:
    assert offered({"depth": "d", "canny": "c"}) == ["canny", "depth"]
    union = offered({"union": "u"})
    assert set(union) == set(UNION_MODES) and set(union) < set(CONTROL_TYPES)
    assert "tile" not in union
    assert Settings.from_env({"SDXL_CONTROLNETS": "union=u"}).control_types == union


# This process serves the one Canny ControlNet (tests/conftest.py).
@pytest.mark.parametrize(
    ("controls", "fields", "said"),
    [
        ([{"type": "depth"}], {}, "do not serve 'depth'; they serve: canny"),
        ([{"type": "canny"}, {"type": "image_prompt"}], {}, "do not serve 'image_prompt'"),
        ([{"type": "canny", "preprocessor": "pose"}], {}, "deriving a pose image needs a model"),
        ([{"type": "canny", "start": 0.6, "end": 0.5}], {}, "start must be less than end"),
        ([{"type": "canny", "scale": 2.5}], {}, "less than or equal to 2"),
        ([{"type": "canny", "weight": 1}], {}, "Extra inputs are not permitted"),
        ([{"type": "canny"}] * 4, {}, "at most 3 items"),
        ([{"type": "canny"}], {"controlnet_conditioning_scale": 0.9}, "with controls, each"),
        ([{"type": "canny"}], {"preprocessor": "none"}, "with controls, each"),
    ],
)
def test_controls_a_server_cannot_honour_are_refused_with_the_reason(
    controls, fields, said
) -> None:
    with pytest.raises(ValidationError, match=said):
        Params(**PROMPT, **fields, controls=controls)


def test_each_control_is_made_as_its_type_says_unless_told() -> None:
    assert Control(type="canny").made_by == "canny"
    assert Control(type="canny", preprocessor="none").made_by == "none"
    assert Control.model_construct(type="depth", preprocessor=None).made_by == "none"
    assert Control.model_construct(type="tile", preprocessor=None).made_by == "tile"


def test_the_gpu_gets_each_control_without_its_image_reference() -> None:
    data_uri = "data:image/png;base64," + base64.b64encode(encode(shapes_image())).decode()
    params = Params(**PROMPT, controls=[{"type": "canny", "image": data_uri, "scale": 0.7}])
    sent = params.generation_params()
    assert [c.model_dump() for c in sent.controls] == [
        {"type": "canny", "scale": 0.7, "start": 0.0, "end": 1.0}
    ]
    # Results and webhooks echo the settings, not the picture.
    echoed = json.loads(params.model_dump_json())["controls"][0]["image"]
    assert echoed == f"data:image/png;base64,… ({len(data_uri)} characters)"


def test_a_canny_control_of_the_upload_is_the_one_control_edge_map_in_rgb() -> None:
    upload = shapes_image(160, 120)
    one, _ = preprocessing.prepare(upload.copy(), Params(**PROMPT))
    listed, resolved = preprocessing.prepare(
        upload.copy(), Params(**PROMPT, controls=[{"type": "canny"}, {"type": "canny"}])
    )
    edges = one.first_control()
    assert one.controls.shape == (1, *edges.shape, 1)
    assert listed.controls.shape == (2, *edges.shape, 3)
    for channel in range(3):
        np.testing.assert_array_equal(listed.controls[0, :, :, channel], edges)
    assert (resolved.width, resolved.height) == (edges.shape[1], edges.shape[0])
    # On the wire, the one Canny control is the GPU Service's `edges` (H×W), the others
    # its `controls`; the GPU Service reads back the request the front made.
    for request, field in ((one, "edges"), (listed, "controls")):
        arguments = request.arguments()
        assert [name for name in ("edges", "controls") if arguments[name] is not None] == [field]
        np.testing.assert_array_equal(GPURequest.of(**arguments).controls, request.controls)


def test_tile_blurs_the_picture_and_none_takes_it_as_it_is() -> None:
    upload = photo(128, 96)
    params = Params(
        **PROMPT,
        controls=[
            {"type": "canny", "preprocessor": "tile"},
            {"type": "canny", "preprocessor": "none"},
        ],
    )
    request, _ = preprocessing.prepare(upload.copy(), params)
    tile, as_is = request.controls.astype(int)
    np.testing.assert_array_equal(as_is, np.asarray(upload.convert("RGB")))
    assert abs(tile.mean() - as_is.mean()) < 2  # the same picture
    detail = lambda rgb: np.square(np.diff(rgb, axis=1)).mean()  # noqa: E731
    assert detail(tile) < detail(as_is) / 4  # little of its detail


def test_a_control_image_of_its_own_is_fitted_to_the_output_size() -> None:
    upload = shapes_image(160, 120)
    params = Params(
        **PROMPT, width=96, height=64, controls=[{"type": "canny", "preprocessor": "none"}]
    )
    own = shapes_image(40, 200)  # another size and aspect ratio: covered and cropped
    request, _ = preprocessing.prepare(upload, params, control_pictures=[own])
    assert request.controls.shape == (1, 64, 96, 3)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("image", "said"),
    [
        ("depth.png", "params.controls\\[0\\].image: .depth.png. is not an https:// URL"),
        ("data:image/png;base64,!!!", "params.controls\\[0\\].image: data URI: not valid base64"),
        (
            "data:image/png;base64," + base64.b64encode(b"not a picture").decode(),
            "params.controls\\[0\\].image: data URI: not an image",
        ),
        ("http://127.0.0.1:9/depth.png", "params.controls\\[0\\].image: URL not fetched"),
    ],
)
async def test_a_control_image_that_is_no_picture_is_refused_naming_it(image, said) -> None:
    params = Params(**PROMPT, controls=[{"type": "canny", "image": image}])
    with pytest.raises(InvalidRequest, match=said):
        await references.control_pictures(params.controls)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
