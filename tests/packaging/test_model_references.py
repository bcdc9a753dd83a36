"""The three models as BentoML model references, resolved offline against a stand-in hub.

BentoML's own ``HuggingFaceModel`` runs unchanged; ``devtools.hub`` answers its requests
from the tiny model, laid out like the real repositories (``devtools.hub_repos``), and
records every file it sends. Each test gets its own BentoML home and Hugging Face cache:
``BENTOML_HF_CACHE_DIR`` is where BentoML 1.4.40 downloads to (read at each resolve), and
``HF_HOME`` isolates the subprocesses (huggingface_hub reads it once, at import).
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
import yaml
from bentoml.models import HuggingFaceModel
from huggingface_hub.errors import RevisionNotFoundError

from devtools.hub import Hub
from devtools.hub_repos import BASE_REPO, CONTROLNET_REPO, VAE_REPO, lay_out
from sdxl_controlnet import model_refs
from tests.conftest import ROOT, TINY_MODEL, Server

INCLUDE = {
    BASE_REPO: model_refs.BASE_INCLUDE,
    CONTROLNET_REPO: model_refs.CONTROLNET_INCLUDE,
    VAE_REPO: model_refs.VAE_INCLUDE,
}
# What no include pattern may ever fetch: other formats, duplicates, checkpoints, pictures.
NEVER = ["*.bin", "*.onnx", "*.onnx_data", "*.msgpack", "*.png", "*.md", ".gitattributes"]
NEVER += ["sd_xl_base_1.0.safetensors", "sdxl_vae.safetensors", "sdxl.vae.safetensors", "vae/*"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    with Hub(lay_out(TINY_MODEL, tmp_path_factory.mktemp("repos"))) as hub:
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


def reference(
    hub: Hub, repo_id: str, precision: str, revision: str | None = None
) -> HuggingFaceModel:
    return HuggingFaceModel(
        repo_id,
        revision=revision or commit(hub, repo_id),
        endpoint=hub.url,
        include=INCLUDE[repo_id][precision],
    )


def snapshot_files(path: str) -> list[str]:
    root = Path(path)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


CASES = [
    (repo, precision)
    for repo in (BASE_REPO, CONTROLNET_REPO, VAE_REPO)
    for precision in ("fp16", "fp32")
]


def requested_paths(hub: Hub, repo_id: str) -> set[str]:
    """The files of ``repo_id`` that any request (HEAD, GET, hub or CDN) named."""
    paths = set()
    for request in hub.requests:
        _, _, url = request.partition(" ")
        rest = url.removeprefix(f"/{repo_id}/")
        if rest != url and not rest.startswith("api/"):
            paths.add(unquote(rest.removeprefix("resolve/").partition("/")[2]))
    return paths


@pytest.mark.parametrize(("repo_id", "precision"), CASES)
def test_resolving_downloads_exactly_the_included_files(
    hub: Hub, caches: Path, repo_id: str, precision: str
) -> None:
    path = reference(hub, repo_id, precision).resolve()

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
    if repo_id != VAE_REPO:  # the fp16-fix VAE has one weights file for both
        assert all(p.endswith(".fp16.safetensors") == (precision == "fp16") for p in weights)


def test_the_fp16_base_download_is_what_the_pipeline_loads_and_nothing_else(hub: Hub) -> None:
    path = reference(hub, BASE_REPO, "fp16").resolve()

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


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_the_downloaded_snapshots_load_as_the_controlnet_pipeline(hub: Hub, precision: str) -> None:
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionXLControlNetPipeline

    base, controlnet, vae = (
        reference(hub, repo, precision).resolve() for repo in (BASE_REPO, CONTROLNET_REPO, VAE_REPO)
    )
    fp16 = precision == "fp16"
    dtype = torch.float16 if fp16 else torch.float32

    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        base,
        controlnet=ControlNetModel.from_pretrained(
            controlnet, dtype=dtype, variant=model_refs.weights_variant(controlnet, fp16)
        ),
        vae=AutoencoderKL.from_pretrained(vae, dtype=dtype),
        dtype=dtype,
        variant=model_refs.weights_variant(base, fp16),
    )

    assert {pipe.unet.dtype, pipe.text_encoder_2.dtype, pipe.controlnet.dtype} == {dtype}
    assert Path(pipe.vae.config._name_or_path) == Path(vae)


def test_a_second_resolve_downloads_nothing(hub: Hub) -> None:
    reference(hub, BASE_REPO, "fp16").resolve()
    hub.reset()

    # A new reference, as a new worker process makes: the pinned commit's files are cached.
    path = reference(hub, BASE_REPO, "fp16").resolve()

    assert hub.served == []
    assert hub.requests == [], "a pinned commit needs no request at all once cached"
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in snapshot_files(path)


def test_a_second_resolve_of_a_branch_only_asks_where_it_points(hub: Hub) -> None:
    reference(hub, VAE_REPO, "fp16", revision="main").resolve()
    hub.reset()

    reference(hub, VAE_REPO, "fp16", revision="main").resolve()

    assert hub.served == []
    assert hub.requests == [f"GET /api/models/{VAE_REPO}/revision/main"]


@pytest.mark.parametrize("revision", ["v2.0", "0" * 40], ids=["branch", "commit"])
def test_a_wrong_revision_fails_naming_the_model_and_revision(hub: Hub, revision: str) -> None:
    ref = reference(hub, CONTROLNET_REPO, "fp16", revision=revision)

    with pytest.raises(RevisionNotFoundError) as download:
        ref.resolve()
    with pytest.raises(RevisionNotFoundError) as build:
        ref.to_info()  # what `bentoml build` records

    for error in (download.value, build.value):
        assert CONTROLNET_REPO in str(error)
        assert revision in str(error)
    assert hub.served == []


def test_build_records_the_commit_and_the_files(hub: Hub) -> None:
    info = reference(hub, BASE_REPO, "fp16", revision="main").to_info()

    assert info.registry == "huggingface"
    assert info.metadata == {
        "model_id": BASE_REPO,
        "revision": commit(hub, BASE_REPO),  # the branch, resolved once, at build time
        "endpoint": hub.url,
        "include": model_refs.BASE_INCLUDE["fp16"],
        "exclude": None,
    }
    # What `bentoml serve` of the Bento rebuilds from bento.yaml downloads that commit.
    HuggingFaceModel.from_info(info).resolve()
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in hub.served_paths(BASE_REPO)


def test_build_asks_the_hub_even_for_a_pinned_commit(hub: Hub) -> None:
    """BentoML 1.4.40 looks a pinned commit up too, so `bentoml build` of a Service with a
    hub reference needs the hub (or a mirror): build offline only from local directories."""
    pinned = commit(hub, VAE_REPO)

    reference(hub, VAE_REPO, "fp16", revision=pinned).to_info()

    assert hub.requests == [f"GET /api/models/{VAE_REPO}/revision/{pinned}"]
    assert hub.served == []


def test_a_local_directory_is_no_reference_and_never_reaches_the_hub(hub: Hub) -> None:
    directory = str(TINY_MODEL / "vae")

    assert model_refs.reference(directory, model_refs.VAE_INCLUDE["fp16"]) == directory
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


# What the GPU Service will declare, in a Service of its own so the build is quick.
SERVICE = textwrap.dedent(
    """
    import os

    import bentoml

    from sdxl_controlnet import model_refs


    @bentoml.service
    class Models:
        base = model_refs.reference(os.environ["SDXL_BASE_MODEL"], model_refs.BASE_INCLUDE["fp16"])
        vae = model_refs.reference(os.environ["SDXL_VAE_MODEL"], model_refs.VAE_INCLUDE["fp16"])

        @bentoml.api
        def paths(self) -> dict[str, str]:
            return {"base": self.base, "vae": self.vae}
    """
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A build context holding the Service above and ``sdxl_controlnet/model_refs.py``."""
    context = tmp_path / "project"
    (context / "sdxl_controlnet").mkdir(parents=True)
    (context / "sdxl_controlnet" / "__init__.py").write_text("")
    source = ROOT / "sdxl_controlnet" / "model_refs.py"
    (context / "sdxl_controlnet" / "model_refs.py").write_text(source.read_text())
    (context / "service.py").write_text(SERVICE)
    (context / "bentofile.yaml").write_text(
        "service: service:Models\nname: models\ninclude: [service.py, sdxl_controlnet/*.py]\n"
    )
    return context


def build(context: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag", "."],
        cwd=context,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def service_models(bento_home: Path) -> list[dict]:
    (bento_yaml,) = bento_home.glob("bentos/models/*/bento.yaml")
    (service,) = yaml.safe_load(bento_yaml.read_text())["services"]
    return service.get("models", [])


@pytest.mark.build
def test_bentoml_build_from_local_directories_needs_no_hub(
    hub: Hub, project: Path, tmp_path: Path
) -> None:
    env = {
        "SDXL_BASE_MODEL": str(TINY_MODEL / "base"),
        "SDXL_VAE_MODEL": str(TINY_MODEL / "vae"),
        "HF_HUB_OFFLINE": "1",
    }
    result = build(project, env)

    assert result.returncode == 0, result.stderr
    assert service_models(tmp_path / "bentoml") == []
    assert hub.requests == []


@pytest.mark.build
@pytest.mark.e2e
def test_bentoml_serve_of_the_bento_downloads_each_included_file_once(
    hub: Hub, project: Path, tmp_path: Path, caches: Path
) -> None:
    env = {
        "SDXL_BASE_MODEL": f"{BASE_REPO}@{commit(hub, BASE_REPO)}",
        "SDXL_VAE_MODEL": VAE_REPO,  # a branch: the build pins the commit it points at
        "HF_ENDPOINT": hub.url,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_HF_CACHE_DIR": str(caches),
    }
    result = build(project, env)
    assert result.returncode == 0, result.stderr
    models = {m["metadata"]["model_id"]: m for m in service_models(tmp_path / "bentoml")}
    assert {repo: m["metadata"]["revision"] for repo, m in models.items()} == {
        BASE_REPO: commit(hub, BASE_REPO),
        VAE_REPO: commit(hub, VAE_REPO),
    }
    assert hub.served == [], "building records references; it downloads nothing"

    tag = result.stdout.strip().removeprefix("__tag__:")
    server = Server(["serve", tag], env=env)
    try:
        server.wait_ready()
        paths = httpx.post(f"{server.url}/paths", json={}, timeout=30).json()
    finally:
        server.stop()

    for name, repo in (("base", BASE_REPO), ("vae", VAE_REPO)):
        assert Path(paths[name]).is_relative_to(caches)
        assert paths[name].endswith(f"/snapshots/{commit(hub, repo)}")
        assert set(hub.served_paths(repo)) <= set(snapshot_files(paths[name]))
        assert snapshot_files(paths[name]) == sorted(requested_paths(hub, repo))
    assert len(hub.served) == len(set(hub.served)), "a file was downloaded twice"
