"""A worker's budgets for its own work: held while the work runs, refused past the budget."""

from __future__ import annotations

import pytest

from sdxl_controlnet.errors import ServiceBusy
from sdxl_controlnet.front.admission import Budget, pixels
from sdxl_controlnet.middleware import RETRY_AFTER


class _Request:
    def __init__(self) -> None:
        self.scope: dict = {}


def test_work_past_the_budget_is_a_503_to_retry_and_holds_nothing() -> None:
    budget = Budget(lambda: 10, "pictures: busy")
    with budget.held(6):
        with budget.held(4):
            assert budget.in_use == 10
        request = _Request()
        with pytest.raises(ServiceBusy) as busy, budget.held(5, request):  # type: ignore[arg-type]
            pass
        assert busy.value.retry_after_s == 1 and busy.value.message.startswith("pictures: busy")
        assert request.scope[RETRY_AFTER] == 1
        assert budget.in_use == 6
    assert budget.in_use == 0


def test_work_larger_than_the_whole_budget_runs_alone() -> None:
    budget = Budget(lambda: 10, "busy")
    with budget.held(25), pytest.raises(ServiceBusy), budget.held(1):
        pass
    with budget.held(1), pytest.raises(ServiceBusy), budget.held(25):
        pass


def test_a_picture_costs_its_pixels_by_its_header() -> None:
    class Header:
        width, height = 4096, 3

    assert pixels(Header(), None, Header()) == 2 * 4096 * 3
