"""Failures while a request is read, as sentences naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sdxl_controlnet import request_errors
from sdxl_controlnet.schemas import Params


def test_a_validation_error_reads_as_one_sentence_per_field() -> None:
    with pytest.raises(ValidationError) as error:
        Params.model_validate({"prompt": "", "num_inference_steps": 10**6})
    body = request_errors.validation_body(error.value)
    assert body["error"] == (
        "prompt: String should have at least 1 character; "
        "num_inference_steps: Input should be less than or equal to 100"
    )
    assert [item["loc"] for item in body["detail"]] == [("prompt",), ("num_inference_steps",)]


def test_a_value_error_loses_its_prefix() -> None:
    error = {"loc": ("params", "width"), "msg": "Value error, too wide"}
    assert request_errors.sentence(error) == "params.width: too wide"


def test_a_field_error_names_its_field() -> None:
    exc = request_errors.field_error("Input", "params", "JSON nested too deeply")
    assert request_errors.validation_body(exc)["error"] == "params: JSON nested too deeply"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
        (b'{"prompt": "\xff"}', "not UTF-8 text"),
        ('{"seed": ' + "9" * 5000 + "}", "not valid JSON"),
        ("{not json", None),  # BentoML keeps it as text, and pydantic says why
        ('{"prompt": "x"}', None),
    ],
)
def test_json_failures_that_bentoml_does_not_catch(text: str | bytes, problem: str | None) -> None:
    found = request_errors._json_failure(text)
    assert (found or None) == problem or (problem and found.startswith(problem))
