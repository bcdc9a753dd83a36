"""Failures while a request is read, as sentences naming the field, and every error
answer in one shape."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from sdxl_controlnet import errors
from sdxl_controlnet.bentoml_compat import request_reading
from sdxl_controlnet.schemas import Params


def test_a_validation_error_reads_as_one_sentence_per_field() -> None:
    with pytest.raises(ValidationError) as error:
        Params.model_validate({"prompt": "", "num_inference_steps": 10**6})
    body = errors.validation_body(error.value)
    assert body["error"] == (
        "prompt: String should have at least 1 character; "
        "num_inference_steps: Input should be less than or equal to 100"
    )
    assert [item["loc"] for item in body["detail"]] == [("prompt",), ("num_inference_steps",)]


def test_a_value_error_loses_its_prefix() -> None:
    error = {"loc": ("params", "width"), "msg": "Value error, too wide"}
    assert errors.sentence(error) == "params.width: too wide"


def test_a_field_error_names_its_field() -> None:
    exc = errors.field_error("Input", "params", "JSON nested too deeply")
    assert errors.validation_body(exc)["error"] == "params: JSON nested too deeply"


@pytest.mark.parametrize(
    ("status", "raw", "body"),
    [
        # BentoML's 4xx branch answers a list
        (415, b'[{"error": "pickle is not allowed"}]', {"error": "pickle is not allowed"}),
        # plain text: /readyz's 503, an unknown route
        (404, b"Not Found", {"error": "Not Found"}),
        (503, b"", {"error": "Service Unavailable"}),
        (400, b'["a", "b"]', {"error": "Bad Request", "detail": ["a", "b"]}),
        # ours already
        (503, b'{"error": "busy", "retry_after_s": 3}', {"error": "busy", "retry_after_s": 3}),
    ],
)
def test_every_error_answer_becomes_one_object_with_error(status, raw, body) -> None:
    assert errors.in_shape(status, raw) == body


def test_bentomls_validation_error_is_rewritten_as_sentences() -> None:
    with pytest.raises(ValidationError) as error:
        Params.model_validate({"prompt": ""})
    detail = json.loads(error.value.json())  # as BentoML sends it, with urls
    raw = json.dumps({"error": "1 validation error for Input", "detail": detail}).encode()
    body = errors.in_shape(400, raw)
    assert body["error"] == "prompt: String should have at least 1 character"
    assert "url" not in body["detail"][0]


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
    found = request_reading._json_failure(text)
    assert (found or None) == problem or (problem and found.startswith(problem))


@pytest.mark.parametrize("status", [400, 409, 413, 415, 503, 504, 507])
def test_bentomls_client_raises_for_each_status_once_the_errors_are_imported(status) -> None:
    """Importing ``errors`` registers its classes in BentoML's client's status map: the
    client must still build them, as it builds its own (an in-process test, then a client)."""
    import httpx
    from _bentoml_impl.client.base import map_exception

    raised = map_exception(httpx.Response(status, text='{"error": "x"}'))
    assert int(raised.error_code) == status and raised.message == '{"error": "x"}'
