"""The models as BentoML model references, resolved offline against a stand-in hub.

BentoML's own ``HuggingFaceModel`` runs unchanged; ``devtools.hub`` answers its requests
from the tiny model, laid out like the real repositories (``devtools.hub_repos``), and
records every file it sends. Each test gets its own BentoML home and Hugging Face cache:
``BENTOML_HF_CACHE_DIR`` is where BentoML 1.4.40 downloads to (read at each resolve), and
``HF_HOME`` isolates the subprocesses (huggingface_hub reads it once, at import).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import yaml
from bentoml.models import HuggingFaceModel
from huggingface_hub.errors import RevisionNotFoundError

from devtools.harness import (
    ROOT,
    TINY_ADAPTERS,
    TINY_MODEL,
    Server,
    decode,
    encode,
    post_generate,
    shapes_image,
    tiny_model_env,
)
from devtools.hub import Hub
from devtools.hub_repos import (
    BASE_REPO,
    CONTROLNET_REPO,
    DEPTH_REPO,
    PREVIEW_REPO,
    UNION_REPO,
    VAE_REPO,
    lay_out,
)
from sdxl_controlnet.gpu import model_refs
from sdxl_controlnet.schemas import GenerationParams, GPURequest

# The models the default configuration declares.
INCLUDE = {
    BASE_REPO: model_refs.BASE_INCLUDE,
    CONTROLNET_REPO: model_refs.CONTROLNET_INCLUDE,
    VAE_REPO: model_refs.VAE_INCLUDE,
    PREVIEW_REPO: model_refs.PREVIEW_INCLUDE,
}
# The ControlNets SDXL_CONTROLNETS may declare beside the Canny one: a depth one, a Union.
MORE_CONTROLNETS = {
    DEPTH_REPO: model_refs.CONTROLNET_INCLUDE,
    UNION_REPO: model_refs.UNION_INCLUDE,
}
EVERY_REPO = INCLUDE | MORE_CONTROLNETS
# What no include pattern may ever fetch: other formats, duplicates, checkpoints, pictures,
# other models (the Union's ProMax).
NEVER = ["*.bin", "*.pth", "*.onnx", "*.onnx_data", "*.msgpack", "*.png", "*.md", ".gitattributes"]
NEVER += ["sd_xl_base_1.0.safetensors", "sdxl_vae.safetensors", "sdxl.vae.safetensors", "vae/*"]
NEVER += ["images/*", "config_promax.json", "diffusion_pytorch_model_promax.safetensors"]


# A LoRA repository like ByteDance/SDXL-Lightning: several weight files, one per variant.
LORA_REPO = "org/tiny-lightning"
LORA_WEIGHTS = "tiny_lightning_4step_lora.safetensors"


def lora_repo(out: Path) -> Path:
    out.mkdir()
    weights = (TINY_ADAPTERS / "style" / "pytorch_lora_weights.safetensors").read_bytes()
    for name in (LORA_WEIGHTS, "tiny_lightning_8step_lora.safetensors", "tiny_lightning.ckpt"):
        (out / name).write_bytes(weights)
    (out / "README.md").write_text("# tiny Lightning stand-in\n")
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    repos = tmp_path_factory.mktemp("repos")
    with Hub({**lay_out(TINY_MODEL, repos), LORA_REPO: lora_repo(repos / "lora")}) as hub:
        yield hub


@pytest.fixture(autouse=True)
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: Hub) -> Path:
    """A BentoML home and Hugging Face cache of this test's own; the hub's log emptied."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("BENTOML_HF_CACHE_DIR", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    hub.reset()
    return tmp_path / "hf-cache"


def commit(hub: Hub, repo_id: str) -> str:
    return hub.repos[repo_id].commit


def reference(hub: Hub, repo_id: str, revision: str | None = None) -> HuggingFaceModel:
    return HuggingFaceModel(
        repo_id,
        revision=revision or commit(hub, repo_id),
        endpoint=hub.url,
        include=EVERY_REPO[repo_id],
    )


def snapshot_files(path: str) -> list[str]:
    root = Path(path)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def requested_paths(hub: Hub, repo_id: str) -> set[str]:
    """The files of ``repo_id`` that any request (HEAD, GET, hub or CDN) named."""
    paths = set()
    for request in hub.requests:
        _, _, url = request.partition(" ")
        rest = url.removeprefix(f"/{repo_id}/")
        if rest != url and not rest.startswith("api/"):
            paths.add(unquote(rest.removeprefix("resolve/").partition("/")[2]))
    return paths


@pytest.mark.parametrize("repo_id", list(EVERY_REPO))
def test_resolving_downloads_exactly_the_included_files(
    hub: Hub, caches: Path, repo_id: str
) -> None:
    path = reference(hub, repo_id).resolve()

    files = snapshot_files(path)
    assert Path(path).is_relative_to(caches)
    assert files == sorted(requested_paths(hub, repo_id))
    # Files with equal content share one blob in the cache: one download serves both.
    assert set(hub.served_paths(repo_id)) <= set(files)
    assert len(hub.served) == len(set(hub.served)), "a file left the stand-in twice"
    for pattern in NEVER:
        assert not fnmatch.filter(files, pattern), f"{pattern} must stay on the hub"
    weights = [p for p in files if p.endswith(".safetensors")]
    assert weights
    # The VAE and TAESD have only their fp32 file; the Union has fp16 under the plain name.
    if repo_id not in (VAE_REPO, PREVIEW_REPO, UNION_REPO):
        assert all(p.endswith(".fp16.safetensors") for p in weights)


def test_the_fp16_base_download_is_what_the_pipeline_loads_and_nothing_else(hub: Hub) -> None:
    path = reference(hub, BASE_REPO).resolve()

    assert snapshot_files(path) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.fp16.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in hub.served_paths(BASE_REPO)


def test_the_downloaded_fp16_snapshots_load_and_generate_on_the_cpu(hub: Hub) -> None:
    from sdxl_controlnet.gpu.pipeline import ControlNetPipeline

    base, controlnet, vae, preview = (reference(hub, repo).resolve() for repo in INCLUDE)
    # fp16 files, upcast for the CPU
    pipeline = ControlNetPipeline(base, controlnet, vae, preview=preview)

    assert Path(pipeline.pipe.vae.config._name_or_path) == Path(vae)
    params = GenerationParams(prompt="a house", num_inference_steps=2, seed=1, preview_every=1)
    previews: list[int] = []
    images = pipeline.generate(
        GPURequest.of(params, np.zeros((64, 64), np.uint8)),
        on_preview=lambda step, *_: previews.append(step),
    )
    assert images.shape == (1, 64, 64, 3) and previews == [1]


@pytest.mark.parametrize(
    ("name", "repo_id", "said"),
    [
        ("depth", UNION_REPO, "is a ControlNet Union: name it union"),
        ("union", DEPTH_REPO, "is not a ControlNet Union"),
    ],
)
def test_a_downloaded_controlnet_declared_as_what_it_is_not_stops_start_up(
    hub: Hub, name: str, repo_id: str, said: str
) -> None:
    from sdxl_controlnet.gpu.pipeline import ControlNetError, ControlNetPipeline

    path = reference(hub, repo_id).resolve()

    with pytest.raises(ControlNetError) as error:
        ControlNetPipeline(str(TINY_MODEL / "base"), {name: path}, str(TINY_MODEL / "vae"))
    assert str(error.value) == f"SDXL_CONTROLNETS: {name}={path} {said}"


def test_a_second_resolve_downloads_nothing(hub: Hub) -> None:
    reference(hub, BASE_REPO).resolve()
    hub.reset()

    # A new reference, as a new worker process makes: the pinned commit's files are cached.
    path = reference(hub, BASE_REPO).resolve()

    assert hub.served == []
    assert hub.requests == [], "a pinned commit needs no request at all once cached"
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in snapshot_files(path)


def test_a_second_resolve_of_a_branch_only_asks_where_it_points(hub: Hub) -> None:
    reference(hub, VAE_REPO, revision="main").resolve()
    hub.reset()

    reference(hub, VAE_REPO, revision="main").resolve()

    assert hub.served == []
    assert hub.requests == [f"GET /api/models/{VAE_REPO}/revision/main"]


@pytest.mark.parametrize("revision", ["v2.0", "0" * 40], ids=["branch", "commit"])
def test_a_wrong_revision_fails_naming_the_model_and_revision(hub: Hub, revision: str) -> None:
    ref = reference(hub, CONTROLNET_REPO, revision=revision)

    with pytest.raises(RevisionNotFoundError) as download:
        ref.resolve()
    with pytest.raises(RevisionNotFoundError) as build:
        ref.to_info()  # what `bentoml build` records

    for error in (download.value, build.value):
        assert CONTROLNET_REPO in str(error)
        assert revision in str(error)
    assert hub.served == []


def test_build_records_the_commit_and_the_files(hub: Hub) -> None:
    info = reference(hub, BASE_REPO, revision="main").to_info()

    assert info.registry == "huggingface"
    assert info.metadata == {
        "model_id": BASE_REPO,
        "revision": commit(hub, BASE_REPO),  # the branch, resolved once, at build time
        "endpoint": hub.url,
        "include": model_refs.BASE_INCLUDE,
        "exclude": None,
    }
    # What `bentoml serve` of the Bento rebuilds from bento.yaml downloads that commit.
    HuggingFaceModel.from_info(info).resolve()
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in hub.served_paths(BASE_REPO)


def test_build_asks_the_hub_even_for_a_pinned_commit(hub: Hub) -> None:
    """BentoML 1.4.40 looks a pinned commit up too, so `bentoml build` of a Service with a
    hub reference needs the hub (or a mirror): build offline only from local directories."""
    pinned = commit(hub, VAE_REPO)

    reference(hub, VAE_REPO, revision=pinned).to_info()

    assert hub.requests == [f"GET /api/models/{VAE_REPO}/revision/{pinned}"]
    assert hub.served == []


def test_a_local_directory_is_no_reference_and_never_reaches_the_hub(hub: Hub) -> None:
    directory = str(TINY_MODEL / "vae")

    assert (
        model_refs.model_reference(directory, model_refs.VAE_INCLUDE, "SDXL_VAE_MODEL") == directory
    )
    assert hub.requests == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"{BASE_REPO}@{'4' * 40}", model_refs.HubRepo(BASE_REPO, "4" * 40)),
        (VAE_REPO, model_refs.HubRepo(VAE_REPO, "main")),
        ("/models/base", Path("/models/base")),
        ("./models/base", Path("models/base")),
        (str(TINY_MODEL / "base"), TINY_MODEL / "base"),
    ],
)
def test_a_model_setting_is_a_directory_or_a_repository(value: str, expected: object) -> None:
    assert model_refs.parse(value) == expected


def test_a_model_setting_that_is_neither_is_refused_before_the_hub_sees_it() -> None:
    with pytest.raises(ValueError, match="neither an existing directory nor a hub repository"):
        model_refs.parse("models/tiny/missing")


def test_an_adapter_reference_downloads_only_its_weight_file(hub: Hub) -> None:
    from sdxl_controlnet.settings import LoraAdapter

    adapter = LoraAdapter(model=f"{LORA_REPO}@{commit(hub, LORA_REPO)}", weight_name=LORA_WEIGHTS)
    ref = model_refs.model_reference(adapter.model, [adapter.weight_name], "LORA_ADAPTERS")
    assert isinstance(ref, HuggingFaceModel)
    ref.endpoint = hub.url

    assert snapshot_files(ref.resolve()) == [LORA_WEIGHTS]
    assert hub.served_paths(LORA_REPO) == [LORA_WEIGHTS]


def test_declared_hub_adapters_are_models_of_the_gpu_service() -> None:
    """BentoML collects a Service's models from its class attributes, so `bentoml build`
    records each adapter's commit and `bentoml serve` downloads it before the workers start."""
    declared = {
        "lightning": {"model": f"{LORA_REPO}@{'a' * 40}", "weight_name": LORA_WEIGHTS},
        "local": {"model": str(TINY_ADAPTERS / "style")},
    }
    code = (
        "import service; "
        "print([(m.model_id, m.revision, m.include) "
        "for m in service.SDXLControlNetService.models])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **tiny_model_env(), "LORA_ADAPTERS": json.dumps(declared)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str([(LORA_REPO, "a" * 40, [LORA_WEIGHTS])])


# The GPU Service started as each of its workers starts it: its models resolved (downloaded
# where not cached) and the pipeline loaded from them; then one generation with two of the
# controls it offers. Prints, as JSON, what `bentoml build` records of its models (each
# one's to_info(): _bentoml_sdk/service/factory.py collects them, bento.py writes them) and
# which ControlNets the pipeline loaded.
START_GPU_SERVICE = """
import json

import numpy as np

import service
from sdxl_controlnet.schemas import ControlSettings, GenerationParams, GPURequest
from sdxl_controlnet.settings import settings

gpu = service.SDXLControlNetService()
controls = [ControlSettings(type=kind) for kind in settings.control_types[:2]]
params = GenerationParams(prompt="x", num_inference_steps=1, seed=1, controls=controls)
pipeline = gpu.worker.pipeline
images = pipeline.generate(GPURequest.of(params, controls=np.zeros((2, 64, 64, 3), np.uint8)))
print(json.dumps({
    "models": [m.to_info().metadata for m in service.SDXLControlNetService.models],
    "loaded": {name: type(net).__name__ for name, net in pipeline.controlnets.items()},
    "images": images.shape,
}))
"""


@pytest.mark.parametrize(
    "declared",
    [
        pytest.param({"union": UNION_REPO}, marks=pytest.mark.thorough),
        {"canny": CONTROLNET_REPO, "depth": DEPTH_REPO},
    ],
    ids=["union", "canny+depth"],
)
def test_each_declared_controlnet_is_a_model_of_the_gpu_service_downloaded_and_loaded(
    hub: Hub, declared: dict[str, str]
) -> None:
    """SDXL_CONTROLNETS=union=… or canny=…,depth=… with pinned hub references: one model
    reference each, which downloads exactly its include patterns (not the Union's ProMax
    files) and loads through from_pretrained, the Union as a ControlNetUnionModel."""
    controlnets = ",".join(f"{name}={repo}@{commit(hub, repo)}" for name, repo in declared.items())
    env = {
        **tiny_model_env(),  # the base, VAE and preview from local directories
        "SDXL_CONTROLNETS": controlnets,
        "HF_ENDPOINT": hub.url,
        "LORA_ADAPTERS": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", START_GPU_SERVICE],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    started = json.loads(result.stdout.strip().splitlines()[-1])

    assert started["models"] == [
        {
            "model_id": repo,
            "revision": commit(hub, repo),
            "endpoint": hub.url,
            "include": EVERY_REPO[repo],
            "exclude": None,
        }
        for repo in declared.values()
    ]
    for repo in declared.values():
        assert hub.served_paths(repo) == sorted(EVERY_REPO[repo])
    assert len(hub.served) == len(set(hub.served)), "a file left the stand-in twice"
    assert started["loaded"] == {
        name: "ControlNetUnionModel" if name == "union" else "ControlNetModel" for name in declared
    }
    assert started["images"] == [1, 64, 64, 3]


# What the GPU Service will declare, in a Service of its own so the build is quick.
def build(env: dict[str, str]) -> str:
    """`bentoml build` of this project with ``env`` set; the Bento's tag."""
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag", "."],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().removeprefix("__tag__:")


def gpu_service_models(bento_home: Path, tag: str) -> list[dict]:
    name, version = tag.split(":")
    return bento_gpu_models(bento_home / "bentos" / name / version)


def bento_gpu_models(bento: Path) -> list[dict]:
    """The models the GPU Service of the Bento in ``bento`` declares."""
    bento_yaml = yaml.safe_load((bento / "bento.yaml").read_text())
    (gpu,) = [s for s in bento_yaml["services"] if s["name"] == "SDXLControlNetService"]
    return gpu.get("models", [])


def generates(server: Server) -> bool:
    response = post_generate(
        server.url, encode(shapes_image(64, 64)), {"prompt": "x", "num_inference_steps": 1}
    )
    return response.status_code == 200 and decode(response.content).size == (64, 64)


@pytest.fixture
def hub_models(hub: Hub, tmp_path: Path, caches: Path) -> dict[str, str]:
    """The production settings, pointed at the stand-in hub: four pinned references."""
    return {
        "SDXL_BASE_MODEL": f"{BASE_REPO}@{commit(hub, BASE_REPO)}",
        "SDXL_CONTROLNET_MODEL": f"{CONTROLNET_REPO}@{commit(hub, CONTROLNET_REPO)}",
        "SDXL_VAE_MODEL": f"{VAE_REPO}@{commit(hub, VAE_REPO)}",
        "SDXL_PREVIEW_MODEL": f"{PREVIEW_REPO}@{commit(hub, PREVIEW_REPO)}",
        "HF_ENDPOINT": hub.url,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_HF_CACHE_DIR": str(caches),
        "HF_HOME": str(tmp_path / "hf-home"),
    }


@pytest.mark.build
def test_bentoml_build_from_local_directories_needs_no_hub(local_bento: Path) -> None:
    """Built with the hub unreachable (HF_HUB_OFFLINE), it records no model to download."""
    assert bento_gpu_models(local_bento) == []


@pytest.mark.build
@pytest.mark.e2e
def test_the_bento_records_four_pinned_models_and_serve_downloads_each_included_file_once(
    hub: Hub, hub_models: dict[str, str], tmp_path: Path
) -> None:
    tag = build(hub_models)
    models = gpu_service_models(tmp_path / "bentoml", tag)
    assert {m["metadata"]["model_id"]: m["metadata"]["revision"] for m in models} == {
        repo: commit(hub, repo) for repo in INCLUDE
    }
    assert {m["metadata"]["model_id"]: m["metadata"]["include"] for m in models} == INCLUDE
    assert hub.served == [], "building records references; it downloads nothing"

    with serving_bento(tag, hub_models) as server:
        assert generates(server)
    for repo in INCLUDE:
        served = hub.served_paths(repo)
        assert served and all(
            any(fnmatch.fnmatch(path, pattern) for pattern in INCLUDE[repo]) for path in served
        ), f"{repo}: a file outside the include patterns left the stand-in"
    assert len(hub.served) == len(set(hub.served)), "a file was downloaded twice"

    hub.reset()
    with serving_bento(tag, hub_models) as server:  # a restart: everything is cached
        assert generates(server)
    assert hub.requests == []


@pytest.mark.e2e
def test_a_wrong_revision_stops_start_up_naming_the_model_and_the_revision(
    hub_models: dict[str, str],
) -> None:
    wrong = "0" * 40
    env = {**hub_models, "SDXL_CONTROLNET_MODEL": f"{CONTROLNET_REPO}@{wrong}"}
    log = start_failure_log(env)
    assert CONTROLNET_REPO in log and wrong in log


def start_failure_log(env: dict[str, str]) -> str:
    """The log of a `bentoml serve .` that must stop before it is ready."""
    server = Server(["serve", "."], env=env)
    try:
        with pytest.raises(RuntimeError, match="server exited early"):
            server.wait_ready()
    finally:
        server.stop()
    return server.log.read_text()


@contextlib.contextmanager
def serving_bento(tag: str, env: dict[str, str]) -> Iterator[Server]:
    server = Server(["serve", tag], env=env)
    try:
        server.wait_ready(timeout=300)
        yield server
    finally:
        server.stop()


@pytest.mark.build
@pytest.mark.e2e
def test_an_unreachable_hub_stops_build_and_start_in_one_line_naming_the_setting(
    tmp_path: Path,
) -> None:
    """Local models, and the preview decoder left at its hub default, offline: one line that
    names SDXL_PREVIEW_MODEL and what to do, not the hub client's traceback."""
    from sdxl_controlnet.settings import Settings

    preview = Settings.model_fields["sdxl_preview_model"].default
    env = {
        **tiny_model_env(),
        "SDXL_PREVIEW_MODEL": preview,
        "HF_HUB_OFFLINE": "1",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    expected = (
        f"SDXL_PREVIEW_MODEL={preview}: not available from the Hugging Face hub (",
        "set SDXL_PREVIEW_MODEL to a local folder of the model, or empty to do without it",
    )
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "."],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode != 0
    assert all(part in built.stderr for part in expected), built.stderr[-2000:]
    assert "Traceback" not in built.stderr

    log = start_failure_log(env)
    assert all(part in log for part in expected), log[-2000:]
    assert "Traceback" not in log
