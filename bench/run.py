"""Benchmark both Services: `make bench`, or `python -m bench.run [--compare OLD.json]`.

Prints a table, writes every sample to bench/results/latest.json and ends with
`targets: N/M met`. It reports and never fails: the exit status is 0 whatever
the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from devtools.harness import tiny_adapters_env, tiny_model_env
from devtools.redis_server import running_redis

# Before the application reads its settings: the tiny model's random LoRA adapters, the
# few-step one with a preset, declared for the pipeline below and the served one alike.
os.environ.update(tiny_adapters_env())

from bench import inprocess, served
from bench.report import Row, compare, table
from sdxl_controlnet.gpu.pipeline import ControlNetPipeline
from sdxl_controlnet.settings import settings

RESULTS = Path(__file__).parent / "results" / "latest.json"


def measure(quick: bool) -> list[Row]:
    runs = 5 if quick else 15
    start = time.monotonic()

    def section(name: str) -> None:
        print(f"[{time.monotonic() - start:5.0f} s] {name}", file=sys.stderr, flush=True)

    section("preprocessing, transfer, encoding")
    rows = inprocess.preprocessing_rows(runs) + inprocess.transfer_rows(runs)
    rows += inprocess.encoding_rows(runs)
    section("batching in the pipeline")
    model = tiny_model_env()  # the server below runs the same model
    adapters = {name: (a.model, a.weight_name) for name, a in settings.lora_adapters.items()}
    pipeline = ControlNetPipeline(
        model["SDXL_BASE_MODEL"],
        model["SDXL_CONTROLNET_MODEL"],
        model["SDXL_VAE_MODEL"],
        adapters=adapters,
        preview=model["SDXL_PREVIEW_MODEL"] or None,
    )
    rows += inprocess.batching_rows(pipeline, runs=2 if quick else 3)
    section("image-to-image and inpainting")
    rows += inprocess.mode_rows(pipeline, runs=3 if quick else 5)
    section("few-step preset and LoRA adapters")
    rows += inprocess.adapter_rows(pipeline, runs=3 if quick else 5)
    section("live previews")
    rows += inprocess.preview_rows(pipeline, runs=3 if quick else 5)
    section("speed levers: the ControlNet skipped, the prompt cache")
    rows += inprocess.lever_rows(pipeline, runs=3 if quick else 5)
    section("a second control: ControlNets for canny and depth, and a ControlNet Union")
    rows += inprocess.control_rows(runs=3 if quick else 5)
    section("image prompts: an IP-Adapter beside the controls")
    rows += inprocess.image_prompt_rows(runs=3 if quick else 5)
    section("cold start")
    server, cold_start = served.start_server()
    try:
        rows.append(cold_start)
        section("end-to-end overhead")
        rows += served.overhead_rows(server, pipeline, runs=4 if quick else 8)
        section("throughput")
        rows += served.throughput_rows(server, pipeline, rounds=1 if quick else 2)
        section("jobs: the embedded store, and Redis")
        with running_redis() as url, served.shared_server(url) as shared:
            rows += served.job_rows(
                server, shared, runs=4 if quick else 10, rounds=1 if quick else 3
            )
    finally:
        server.stop()
    section("done")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, help="an earlier results file to compare with")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write results")
    parser.add_argument("--quick", action="store_true", help="fewer runs: a smoke test")
    args = parser.parse_args()

    start = time.monotonic()
    rows = measure(args.quick)
    results = {
        "machine": f"{platform.machine()}, {platform.python_version()}, {_cpus()} CPUs",
        "seconds": round(time.monotonic() - start),
        "rows": [row.as_dict() for row in rows],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))

    print(table(rows))
    if args.compare:
        print(f"\ncompared with {args.compare}:")
        print(compare(results["rows"], json.loads(args.compare.read_text())["rows"]))
    print(f"\n{results['machine']}; {results['seconds']} s; results in {args.output}")
    verdicts = [row.met for row in rows if row.met is not None]
    print(f"targets: {sum(verdicts)}/{len(verdicts)} met")


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
