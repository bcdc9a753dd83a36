"""The application's own Prometheus metrics, served beside BentoML's on /metrics.

BentoML already counts each Service's requests and times them per endpoint. These add
what only the GPU Service knows: how long a request queued for the GPU, how long the
pipeline ran, how many images it made, and how many requests it refused as too late;
and on the front, how its jobs wait and how its webhooks fared.
"""

from __future__ import annotations

# prometheus_client itself: bentoml.metrics is a deprecated alias for it. BentoML starts its
# workers with PROMETHEUS_MULTIPROC_DIR set, so every worker's values reach /metrics.
from prometheus_client import Counter, Gauge, Histogram

# From a few-step preview on a GPU to a long queue behind 100-step batches.
SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

QUEUE_WAIT = Histogram(
    "sdxl_controlnet_queue_wait_seconds",
    "Time a request waited for the GPU before its generation started.",
    buckets=SECONDS_BUCKETS,
)
GENERATION = Histogram(
    "sdxl_controlnet_generation_seconds",
    "Time one request held the GPU, generating.",
    buckets=SECONDS_BUCKETS,
)
PIPELINE = Histogram(
    "sdxl_controlnet_pipeline_seconds",
    "Time the pipeline took for one request on its thread, diffusers' call and its set-up: "
    "the generation's time less this is the GPU Service's own overhead.",
    buckets=SECONDS_BUCKETS,
)
IMAGES_GENERATED = Counter("sdxl_controlnet_images_generated", "Images generated.")
REFUSED_BUSY = Counter(
    "sdxl_controlnet_refused_busy",
    "Requests refused at once because the queue could not finish them within the timeout.",
)
STEP_SECONDS = Gauge(
    "sdxl_controlnet_step_seconds",
    "Time the last timed denoising step took: how fast this GPU is right now.",
    multiprocess_mode="mostrecent",
)
GPU_MEMORY_PEAK = Gauge(
    "sdxl_controlnet_gpu_memory_peak_bytes",
    "Peak GPU memory of the GPU Service's worker since it started, as torch.cuda counts it: "
    "allocated (tensors) or reserved (what its caching allocator holds).",
    ["kind"],
    multiprocess_mode="max",
)
COMPILE_COUNTS = Gauge(
    "sdxl_controlnet_compile_events",
    "With TORCH_COMPILE on, what torch counted by the end of the warm-up, by kind: "
    "graph_breaks (a compiled module split, Python between its pieces) and cudagraph_skips "
    "(graphs that run without CUDA graphs). Both are 0 where compiling is as fast as it can be.",
    ["kind"],
    multiprocess_mode="max",
)
UNCOMPILED = Counter(
    "sdxl_controlnet_uncompiled_generations",
    "With TORCH_COMPILE on, generations that ran uncompiled models, by reason: a shape "
    "not warmed, LoRA adapters on, guess mode (its ControlNet only), or recompile (the "
    "warmed graphs' guards failed; the log names the guard).",
    ["reason"],
)
OUTBOUND_FAILURES = Counter(
    "sdxl_controlnet_outbound_failures",
    "Image fetches (use=fetch) and webhook tries (use=webhook) that failed, by kind: policy, "
    "url, timeout, network, status, too_large, not_image.",
    ["use", "kind"],
)
WEBHOOK_TRIES = Counter(
    "sdxl_controlnet_webhook_tries",
    "Webhook tries, by outcome: the answer's class (2xx, 4xx, 5xx) or status (408, 410, "
    "429), or why none came (timeout, network, policy, url).",
    ["outcome"],
)
WEBHOOK_PENDING = Gauge(
    "sdxl_controlnet_webhook_pending",
    "Webhook deliveries waiting for their next try or under way, all front workers together.",
    multiprocess_mode="livesum",
)
WEBHOOK_DELIVERIES = Counter(
    "sdxl_controlnet_webhook_deliveries",
    "Webhook messages, by result: delivered; failed after the last try or an answer that "
    "retrying cannot change; gone (a 410); dropped (WEBHOOK_MAX_PENDING or "
    "WEBHOOK_MAX_PENDING_PER_HOST reached); error (a fault of the server's, in its log).",
    ["result"],
)
JOBS_WAITING = Gauge(
    "sdxl_controlnet_jobs_waiting",
    "Jobs waiting for the GPU in the job store, shared by every replica that uses it: the "
    "signal to scale the GPU Service on.",
    multiprocess_mode="mostrecent",
)
JOBS_RUNNING = Gauge(
    "sdxl_controlnet_jobs_running",
    "Jobs running in the job store, all replicas together.",
    multiprocess_mode="mostrecent",
)
JOB_WAIT = Histogram(
    "sdxl_controlnet_job_wait_seconds",
    "Time a job waited in line, from its submit to its first run.",
    buckets=SECONDS_BUCKETS,
)
