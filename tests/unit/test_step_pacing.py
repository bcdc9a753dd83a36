"""On a GPU, each step's callback waits for the step before it: the CPU stays one step
ahead, so progress, cancellation and step times follow the GPU (gpu/step_pacing.py)."""

from __future__ import annotations

from sdxl_controlnet.gpu.step_pacing import StepPacer


class RecordedEvent:
    """A CUDA event as the pacer uses it, each call written to a shared log."""

    def __init__(self, log: list[str], number: int) -> None:
        self.log, self.number = log, number

    def record(self) -> None:
        self.log.append(f"record {self.number}")

    def synchronize(self) -> None:
        self.log.append(f"wait {self.number}")


def test_on_a_gpu_each_step_waits_for_the_step_before_it_only() -> None:
    log: list[str] = []
    events = iter(range(1, 100))
    pacer = StepPacer("cuda:1", new_event=lambda: RecordedEvent(log, next(events)))
    for _ in range(3):
        pacer.step_done()
    # Step 1 queued: nothing to wait for. Step 2 queued: the GPU has finished step 1, and
    # has step 2 to work on while the callback runs; never a wait on the step just queued.
    assert log == ["record 1", "record 2", "wait 1", "record 3", "wait 2"]


def test_on_the_cpu_nothing_is_recorded_or_awaited() -> None:
    made: list[object] = []
    pacer = StepPacer("cpu", new_event=lambda: made.append(object()))
    for _ in range(3):
        pacer.step_done()
    assert made == []
