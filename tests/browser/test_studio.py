"""The studio page in headless Chromium against a real `bentoml serve`.

Each state is saved as a screenshot under test-artifacts/studio/. `make test` walks the
studio's first journey (a picture, its edges, a generation); the rest is `thorough`, for
`make test-tooling`."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from devtools.harness import (
    ROOT,
    Server,
    as_array,
    decode,
    encode,
    shapes_image,
)
from sdxl_controlnet.schemas import Params

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "test-artifacts" / "studio"

if not CHROMIUM.exists():
    pytest.skip(
        "needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
        allow_module_level=True,
    )

from playwright.sync_api import Locator, Page, expect, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


def open_studio(browser, server: Server, tmp_path: Path) -> Page:
    """The studio on a phone-sized screen, with a picture uploaded."""
    page = browser.new_page(viewport={"width": 390, "height": 1100})
    page.goto(f"{server.url}/studio")
    # The limits come from the OpenAPI schema: wait until they are applied.
    expect(page.locator("[name=num_inference_steps]")).to_have_attribute("max", "100")
    picture = tmp_path / "shapes.png"
    picture.write_bytes(encode(shapes_image(160, 120)))
    page.set_input_files("#image", picture)
    expect(page.locator("#edges")).to_have_attribute("src", re.compile("^blob:"))
    return page


@pytest.fixture
def page(browser, server: Server, tmp_path: Path) -> Iterator[Page]:
    page = open_studio(browser, server, tmp_path)
    yield page
    page.close()


def slide(page: Page, slider: str, value: int) -> None:
    """Move a range input as a user's drag does: a new value, then an input event."""
    page.locator(slider).evaluate(
        "(el, value) => { el.value = value; el.dispatchEvent(new Event('input')); }", value
    )


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def test_moving_a_threshold_updates_the_edge_preview(page: Page) -> None:
    screenshot(page, "1-uploaded")
    before = page.locator("#edges").get_attribute("src")
    slide(page, "#high_threshold", 250)
    slide(page, "#low_threshold", 240)
    expect(page.locator("#edges")).not_to_have_attribute("src", before)
    expect(page.locator("output[for=low_threshold]")).to_have_text("240")
    screenshot(page, "2-thresholds")


def test_generate_shows_progress_then_the_image_and_its_seed(page: Page) -> None:
    page.fill("[name=prompt]", "a red ball on a blue box")
    page.fill("[name=num_inference_steps]", "3")
    page.fill("[name=seed]", "7")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done in", timeout=120_000)
    expect(page.locator("#progress")).to_have_js_property("value", 3)
    expect(page.locator("#progress")).to_have_js_property("max", 3)
    expect(page.locator("#result")).to_have_attribute("src", re.compile("^data:image/png;base64,"))
    expect(page.locator("#seed")).to_have_text("Seed 7")
    expect(page.locator("#download")).to_have_attribute("download", "sdxl-controlnet-7.png")
    screenshot(page, "3-generated")


@pytest.mark.thorough
def test_the_picture_forms_in_place_then_the_result_replaces_it(page: Page, server: Server) -> None:
    page.fill("[name=prompt]", "a red ball on a blue box")
    page.fill("[name=num_inference_steps]", "6")
    with server.slow_steps(0.4):
        page.click("#generate")
        # The studio asks for previews: the frame shows one before the result arrives.
        result = page.locator("#result")
        expect(result).to_have_attribute("src", re.compile("^data:image/webp;base64,"))
        expect(page.locator("#result-figure")).to_contain_text("forming: step")
        expect(page.locator("#status")).not_to_contain_text("Done in")
        screenshot(page, "3a-forming")
        expect(page.locator("#status")).to_contain_text("Done in", timeout=120_000)
    expect(result).to_have_attribute("src", re.compile("^data:image/png;base64,"))
    expect(page.locator("#result-figure")).not_to_have_class(re.compile("forming|stale"))
    expect(page.locator("#result-figure")).not_to_contain_text("forming")


@pytest.mark.thorough
def test_stop_ends_a_forming_picture_at_once_and_marks_it_unfinished(
    page: Page, server: Server
) -> None:
    page.fill("[name=prompt]", "a red ball")
    page.fill("[name=num_inference_steps]", "60")
    with server.slow_steps(0.5):  # 30 s to the result, unless stopped
        page.click("#generate")
        expect(page.locator("#result-figure")).to_contain_text("forming: step")
        page.click("#generate")  # it reads "Stop"
        expect(page.locator("#error")).to_have_text("Stopped.", timeout=5_000)
    expect(page.locator("#generate")).to_have_text("Generate")
    expect(page.locator("#result-figure")).to_have_class(re.compile("stale"))
    expect(page.locator("#result-figure")).to_contain_text("a preview: stopped before the result")
    expect(page.locator("#download")).to_be_hidden()
    screenshot(page, "3b-stopped")


@pytest.mark.thorough
def test_an_api_validation_error_is_shown(page: Page) -> None:
    slide(page, "#low_threshold", 200)
    slide(page, "#high_threshold", 100)
    expect(page.locator("#error")).to_contain_text("low_threshold must not exceed high_threshold")
    screenshot(page, "4-error")


@pytest.mark.thorough
def test_the_empty_studio_shows_frames_not_broken_images(browser, server: Server) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 1100})
    page.goto(f"{server.url}/studio")
    expect(page.locator("#preprocessor option")).to_have_count(2)
    for image in ("#edges", "#result"):
        expect(page.locator(image)).to_be_hidden()
    broken = page.evaluate(
        "[...document.images].filter(i => i.checkVisibility() && !i.naturalWidth).length"
    )
    assert broken == 0
    screenshot(page, "0-empty")
    page.close()


@pytest.mark.thorough
def test_a_failed_generation_leaves_the_last_result_marked_as_previous(page: Page) -> None:
    page.fill("[name=prompt]", "a red ball")
    page.fill("[name=num_inference_steps]", "1")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done in", timeout=120_000)
    expect(page.locator("#result-figure")).not_to_have_class(re.compile("stale"))

    page.route(
        "**/generate_stream",
        lambda route: route.fulfill(
            status=503,
            content_type="application/json",
            body='{"error": "the GPU Service is unavailable or failed; retry in a moment"}',
        ),
    )
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("GPU Service is unavailable")
    expect(page.locator("#result-figure")).to_have_class(re.compile("stale"))
    expect(page.locator("#result-figure")).to_contain_text("previous")
    expect(page.locator("#download")).to_be_hidden()
    expect(page.locator("#status")).to_have_text("")
    screenshot(page, "5-failed-after-success")


@pytest.mark.thorough
def test_preprocessor_none_previews_the_upload_itself(page: Page) -> None:
    before = page.locator("#edges").get_attribute("src")
    page.select_option("#preprocessor", "none")
    expect(page.locator("#edges")).not_to_have_attribute("src", before)
    expect(page.locator("#low_threshold")).to_be_disabled()
    screenshot(page, "6-preprocessor-none")


@pytest.mark.thorough
def test_choosing_a_few_step_adapter_fills_in_its_preset_and_generates(page: Page) -> None:
    expect(page.locator("#lora option")).to_have_text(["none", "detail", "fast", "style"])
    page.select_option("#lora", "fast")
    expect(page.locator("[name=num_inference_steps]")).to_have_value("4")
    expect(page.locator("[name=scheduler]")).to_have_value("euler_trailing")
    expect(page.locator("[name=guidance_scale]")).to_have_value("0")
    page.fill("[name=prompt]", "a red ball")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done in", timeout=120_000)
    expect(page.locator("#progress")).to_have_js_property("max", 4)
    screenshot(page, "adapter-fast")
    page.select_option("#lora", "")
    expect(page.locator("[name=num_inference_steps]")).to_have_value("25")
    expect(page.locator("[name=scheduler]")).to_have_value("euler")


# The mask canvas's opacity, pixel by pixel.
ALPHA = """c => Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data)
    .filter((value, i) => i % 4 === 3)"""
# The default mask_blur (schemas.Params): how far the repaint fades out past the brush.
MASK_BLUR = Params.model_fields["mask_blur"].default
# Pixels of the mask canvas painted opaquely enough to be sent as white.
PAINTED = """c => Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data)
    .filter((value, i) => i % 4 === 3 && value >= 128).length"""


@pytest.mark.thorough
def test_painting_a_mask_over_the_picture_inpaints_it(page: Page) -> None:
    page.check("#use_start")
    canvas = page.locator("#mask")
    expect(canvas).to_be_visible()
    expect(page.locator("#strength")).to_be_enabled()
    expect(page.locator("output[for=strength]")).to_have_text("0.8")
    # The mask takes the picture's own size, whatever the size on screen.
    expect(canvas).to_have_js_property("width", 160)
    expect(canvas).to_have_js_property("height", 120)

    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    stroke = canvas.evaluate(PAINTED)
    assert 0 < stroke < 160 * 120 / 2, "a stroke across the middle"
    screenshot(page, "7-mask-painted")

    page.fill("[name=prompt]", "a red ball")
    page.fill("[name=num_inference_steps]", "4")
    slide(page, "#strength", 0.5)
    page.click("#generate")
    # The server says inpainting only when a mask arrived.
    expect(page.locator("#status")).to_contain_text("inpainting", timeout=120_000)
    expect(page.locator("#progress")).to_have_js_property("max", 2)  # 0.5 of 4 steps
    screenshot(page, "8-inpainted")
    expect(page.locator("#status")).to_contain_text("Done in", timeout=120_000)
    expect(page.locator("#result")).to_have_attribute("src", re.compile("^data:image/png;base64,"))
    # Outside the brush (and mask_blur's fade around it) the result is the upload, to the byte.
    alpha = np.array(canvas.evaluate(ALPHA), np.uint8).reshape(120, 160)
    fade = 2 * MASK_BLUR + 1
    reached = cv2.dilate((alpha >= 128).astype(np.uint8), np.ones((fade, fade), np.uint8))
    result = as_array(
        decode(base64.b64decode(page.locator("#result").get_attribute("src").partition(",")[2]))
    )
    upload = as_array(shapes_image(160, 120))
    assert np.array_equal(result[reached == 0], upload[reached == 0])
    assert not np.array_equal(result[alpha >= 128], upload[alpha >= 128])

    # Inverted, the mask repaints everything but the stroke; cleared, nothing is inpainted.
    page.click("#invert_mask")
    assert canvas.evaluate(PAINTED) == 160 * 120 - stroke
    page.click("#clear_mask")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("image-to-image", timeout=120_000)


# Chromium tells Playwright nothing of a multipart body with a file in it, so the page's
# own fetch keeps each request's params for the test to read.
RECORD_PARAMS = """() => {
    const send = window.fetch;
    window.sentParams = {};
    window.sentParts = {};
    window.fetch = (url, init) => {
        window.sentParams[url] = JSON.parse(init.body.get("params"));
        window.sentParts[url] = [...init.body.keys()];
        return send(url, init);
    };
}"""


def generate_recording_params(page: Page) -> None:
    """Two steps of a prompt, the page's params and parts recorded (RECORD_PARAMS)."""
    page.fill("[name=prompt]", "a red ball on a blue box")
    page.fill("[name=num_inference_steps]", "2")
    page.evaluate(RECORD_PARAMS)
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done in", timeout=120_000)


def own_picture(layer: Locator, kind: str, path: Path, picture: Image.Image) -> None:
    """``layer`` made of type ``kind``, which asks for a picture of its own, given one."""
    layer.locator(".type").select_option(kind)
    expect(layer.locator(".source")).to_have_value("own")
    path.write_bytes(encode(picture))
    layer.locator(".picture").set_input_files(path)
    expect(layer.locator("img")).to_have_attribute("src", re.compile("^blob:"))


@pytest.mark.thorough
def test_two_control_layers_are_sent_as_controls_and_generate(
    browser, canny_and_depth: Server, tmp_path: Path
) -> None:
    page = open_studio(browser, canny_and_depth, tmp_path)
    spec = httpx.get(f"{canny_and_depth.url}/docs.json", timeout=10).json()
    control = spec["components"]["schemas"]["Control"]["properties"]
    offered = control["type"]["enum"]
    assert offered == ["canny", "depth", "image_prompt"]
    most = spec["components"]["schemas"]["Params"]["properties"]["controls"]["maxItems"]

    # As many layers as the schema allows, then one fewer.
    for _ in range(most):
        page.click("#add_layer")
    expect(page.locator("#add_layer")).to_be_disabled()
    page.locator("#layers > li").nth(most - 1).locator(".remove").click()
    expect(page.locator("#layers > li")).to_have_count(2)
    expect(page.locator("#add_layer")).to_be_enabled()
    canny, depth = page.locator("#layers > li").nth(0), page.locator("#layers > li").nth(1)
    expect(canny.locator(".type option")).to_have_text(offered)
    # The one-control fields give way to each layer's own.
    expect(page.locator("[name=controlnet_conditioning_scale]")).to_be_disabled()
    expect(page.locator("#preprocessor")).to_be_disabled()

    # Canny, derived from the upload: its preview is the upload's edges.
    expect(canny.locator(".source")).to_have_value("canny")
    expect(canny.locator("img")).to_have_attribute("src", re.compile("^blob:"))
    # Depth, from a picture of its own: a near-to-far gradient, as a depth map looks.
    gradient = Image.linear_gradient("L").resize((160, 120)).convert("RGB")
    own_picture(depth, "depth", tmp_path / "depth.png", gradient)
    depth.locator(".scale").fill("0.8")
    screenshot(page, "9-layers")

    generate_recording_params(page)
    expect(page.locator("#result")).to_have_attribute("src", re.compile("^data:image/png;base64,"))
    screenshot(page, "10-layers-generated")

    params = page.evaluate("window.sentParams['../generate_stream']")
    assert not {"preprocessor", "controlnet_conditioning_scale"} & params.keys()
    # A layer left as added: the schema's defaults, sent as the page showed them.
    defaults = {name: control[name]["default"] for name in ("scale", "start", "end")}
    assert params["controls"][0] == {"type": "canny", **defaults, "preprocessor": "canny"}
    assert params["controls"][1]["type"] == "depth"
    assert params["controls"][1]["scale"] == 0.8
    # Its picture goes as a file part, which the control names.
    assert params["controls"][1]["image"] == "control_1"
    parts = page.evaluate("window.sentParts['../generate_stream']")
    assert sorted(parts) == ["control_1", "image", "params"]
    page.close()


@pytest.mark.thorough
def test_an_image_prompt_layer_sends_its_picture_beside_a_control_and_generates(
    browser, canny_and_depth: Server, tmp_path: Path
) -> None:
    page = open_studio(browser, canny_and_depth, tmp_path)
    page.click("#add_layer")
    page.click("#add_layer")
    canny, prompt = page.locator("#layers > li").nth(0), page.locator("#layers > li").nth(1)
    # An image prompt derives nothing from the upload: it asks for a picture of its own.
    own_picture(prompt, "image_prompt", tmp_path / "style.png", Image.new("RGB", (64, 64), "pink"))
    expect(prompt.locator(".source option")).to_have_count(2)
    prompt.locator(".scale").fill("0.6")
    screenshot(page, "11-image-prompt")

    generate_recording_params(page)
    expect(page.locator("#error")).to_be_empty()
    expect(page.locator("#result")).to_have_attribute("src", re.compile("^data:image/png;base64,"))
    screenshot(page, "12-image-prompt-generated")

    controls = page.evaluate("window.sentParams['../generate_stream']")["controls"]
    assert [c["type"] for c in controls] == ["canny", "image_prompt"]
    assert controls[1]["scale"] == 0.6
    assert (controls[1]["image"], controls[1]["preprocessor"]) == ("control_1", "none")
    assert sorted(page.evaluate("window.sentParts['../generate_stream']")) == [
        "control_1",
        "image",
        "params",
    ]
    assert canny.locator(".source").input_value() == "canny"
    page.close()
