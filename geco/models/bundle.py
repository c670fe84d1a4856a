"""The GECO inference checkpoint: teacher encoders + one-step generator + reconstructor in one folder.

Layout (a local folder, an ``s3://`` prefix, or MLflow artifacts)::

    <uri>/geco.json                        format name + version, the models config, the component
                                           list, every file with its size, creation time
    <uri>/teacher/                         the Zero123++ layout (geco.models.teacher.save_teacher):
                                           VAE, CLIP vision + text encoders, tokenizer, scheduler,
                                           preprocessors; unet/config.json always, the teacher UNet's
                                           weights only when saved with include_teacher_unet=True
    <uri>/generator/unet/                  the generator's UNet (diffusers save_pretrained, safetensors)
    <uri>/generator/generator.json         t*, input scaling
    <uri>/reconstructor/model.safetensors  the reconstructor (LGM's state-dict layout)

``geco.json`` is written last (uploaded last on S3): a folder without it is not a checkpoint, and
its file list lets :func:`check_bundle` name exactly what a partial copy lacks.

**Inference bundles** (the default, ``include_teacher_unet=False``) leave the teacher UNet's weights
out: generating needs the teacher's VAE and encoders and the generator's UNet only, and at real
scale the teacher UNet is 3.4 GB of float32. :func:`load_bundle` then loads the generator's UNet
once (through the teacher loader's UNet override, so it is read a single time) and leaves a
:class:`MissingUNet` in ``teacher.unet``: it carries the architecture config and raises a clear
error if anything tries to run the teacher (e.g. 75-step sampling).

:func:`resolve_checkpoint` turns a URI into a local folder: a local path; an ``s3://`` prefix
(downloaded through :mod:`geco.storage` into a cache); or an MLflow URI, ``runs:/<run>/<path>``,
``models:/<name>/<version>``, ``models:/<name>@<alias>`` (through ``mlflow.artifacts.download_artifacts``,
using the ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else the project's default
``tracking.uri``, ``sqlite:///mlruns.db``). The registry's side (versions, aliases, metrics) is
:mod:`geco.registry`; stages 1 and 2 log their bundle at ``runs:/<run>/weights/bundle``.

Registering a bundle in the MLflow registry (MLflow 3.17): ``mlflow.register_model("runs:/<id>/<path>")``
refuses a plain artifact folder in MLflow 3 (it looks for a LoggedModel: "Unable to find a
logged_model with artifact_path ..."), and wrapping the bundle as a pyfunc model would add an
MLmodel file, a conda/pip environment and a Python class that nothing here needs. So
:func:`register_bundle` uses the registry client directly, ``MlflowClient.create_model_version(name,
source="runs:/<id>/<path>", run_id=<id>)``, and sets the alias; ``models:/geco@production`` then
downloads exactly the logged folder. :func:`log_bundle` logs a bundle folder as run artifacts.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geco import storage
from geco.config import LGMConfig, ModelsConfig, TrackingConfig, apply_overrides, validate

log = logging.getLogger(__name__)

__all__ = [
    "Bundle",
    "CheckpointError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MissingUNet",
    "TINY_MODELS",
    "bundle_fingerprint",
    "check_bundle",
    "init_tiny_bundle",
    "load_bundle",
    "log_bundle",
    "read_manifest",
    "register_bundle",
    "resolve_checkpoint",
    "save_bundle",
    "tiny_models_config",
]

FORMAT_NAME = "geco-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "geco.json"
TEACHER_DIR = "teacher"
GENERATOR_DIR = "generator"
RECONSTRUCTOR_FILE = "reconstructor/model.safetensors"
TEACHER_UNET_WEIGHTS = "teacher/unet/diffusion_pytorch_model.safetensors"
EXPECTED_LAYOUT = ("geco.json, teacher/ (Zero123++ folder: vae/, vision_encoder/, text_encoder/, tokenizer/, "
                   "scheduler/, feature_extractor_*/, unet/config.json), generator/unet/ (diffusers UNet), "
                   "reconstructor/model.safetensors")
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")

# A tiny model set for `geco models init-tiny`, tests and the embedded demo (CPU, seconds).
TINY_MODELS: dict[str, Any] = {
    "teacher": {"tile_size": 32, "cond_size": 32, "tiny_clip_image_size": 32},
    "reconstructor": {"input_size": 32, "lgm": {"down_channels": [8, 16, 32], "down_attention": [False, False, True],
                                                "up_channels": [32, 16], "up_attention": [True, False], "num_heads": 2,
                                                "norm_groups": 4, "layers_per_block": 1}},
}


class CheckpointError(FileNotFoundError):
    """A checkpoint URI that does not resolve to a whole GECO checkpoint (the message says what is
    missing and what was expected)."""


# ================================================================================================
# The teacher UNet an inference bundle leaves out
# ================================================================================================
class MissingUNet(nn.Module):
    """Stands in for the teacher UNet in a bundle saved without it: keeps the architecture config
    (the teacher reads latent channels from it) and raises a clear error when called."""

    def __init__(self, config, where: str = "", dtype: torch.dtype = torch.float32):
        super().__init__()
        self._unet_config = config
        self.where = where
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def config(self):
        return self._unet_config

    @property
    def attn_processors(self) -> dict:
        return {}

    def set_attn_processor(self, processors) -> None:  # reference attention has nothing to patch
        return None

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"the teacher UNet is not in this checkpoint ({self.where or 'inference bundle'}: saved with "
            "include_teacher_unet=False). Generating with the one-step generator does not need it; teacher "
            "sampling does: use a bundle saved with include_teacher_unet=True.")


# ================================================================================================
# Saving
# ================================================================================================
@dataclass
class Bundle:
    """A loaded checkpoint: ``teacher`` (encoders, VAE, schedule), ``generator``, ``reconstructor``,
    the ``cfg`` it was saved with, its local ``root`` and ``manifest`` (geco.json)."""

    teacher: Any
    generator: Any
    reconstructor: Any
    cfg: ModelsConfig
    root: Path | None = None
    manifest: dict = field(default_factory=dict)

    @property
    def teacher_has_unet(self) -> bool:
        return not isinstance(self.teacher.unet, MissingUNet)

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def to(self, device: str | torch.device) -> "Bundle":
        self.teacher.to(device)
        self.generator.to(device)
        self.reconstructor.to(device)
        return self

    def eval(self) -> "Bundle":
        for m in (self.teacher, self.generator, self.reconstructor):
            m.eval()
        return self


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _geco_version() -> str:
    try:
        from importlib.metadata import version

        return version("geco")
    except Exception:  # noqa: BLE001 - running from a source tree without an install
        return "unknown"


def _num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _stripped_config(models_cfg: ModelsConfig) -> dict:
    """The models config as stored: weight locations blanked (the bundle holds the weights)."""
    d = models_cfg.model_dump(mode="json")
    d["teacher"]["pretrained"] = ""
    d["teacher"]["unet"] = ""
    d["teacher"]["cache_dir"] = ""
    d["generator"]["pretrained"] = ""
    d["reconstructor"]["pretrained"] = ""
    return d


def _write_bundle(root: Path, teacher, generator, reconstructor, models_cfg: ModelsConfig,
                  include_teacher_unet: bool) -> None:
    from geco.models.generator import save_generator
    from geco.models.reconstructors import save_reconstructor
    from geco.models.teacher import save_teacher

    root.mkdir(parents=True, exist_ok=True)
    placeholder = isinstance(teacher.unet, MissingUNet)
    if placeholder and include_teacher_unet:
        raise ValueError("include_teacher_unet=True, but this teacher has no UNet (it came from an inference bundle)")
    if placeholder:  # save_teacher writes unet/ from a real module: lend it the generator's (same config)
        stand_in = teacher.unet
        teacher.unet = generator.unet
        try:
            save_teacher(teacher, root / TEACHER_DIR)
        finally:
            teacher.unet = stand_in
    else:
        save_teacher(teacher, root / TEACHER_DIR)
    if not include_teacher_unet:
        (root / TEACHER_UNET_WEIGHTS).unlink()
    save_generator(generator, root / GENERATOR_DIR)
    save_reconstructor(reconstructor, str(root / RECONSTRUCTOR_FILE), dtype=None)
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created": _now(),
        "bundle_id": uuid.uuid4().hex,  # a new id per save: download caches key on it
        "geco_version": _geco_version(),
        "layout": EXPECTED_LAYOUT,
        "components": {
            "teacher": {"path": TEACHER_DIR, "layout": "zero123plus (sudo-ai/zero123plus-v1.2)",
                        "unet_included": bool(include_teacher_unet), "source": teacher.source or "tiny random",
                        "note": ("full teacher (75-step sampling available)" if include_teacher_unet else
                                 "inference bundle: the teacher UNet's weights are omitted (unet/config.json "
                                 "kept); the one-step generator does not need them")},
            "generator": {"path": GENERATOR_DIR, "unet": f"{GENERATOR_DIR}/unet", "timestep": generator.timestep,
                          "scale_input_by_sigma": bool(generator.cfg.scale_input_by_sigma),
                          "parameters": _num_params(generator.unet)},
            "reconstructor": {"path": RECONSTRUCTOR_FILE, "layout": "LGM (unet.*, conv.*)",
                              "parameters": _num_params(reconstructor),
                              "dtype": str(reconstructor.dtype).replace("torch.", "")},
        },
        "models": _stripped_config(models_cfg),
        "sources": {"teacher": models_cfg.teacher.pretrained, "teacher_unet": models_cfg.teacher.unet,
                    "generator": models_cfg.generator.pretrained,
                    "reconstructor": models_cfg.reconstructor.pretrained},
        "files": files,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks a whole bundle


def save_bundle(dest: str | os.PathLike, teacher, generator, reconstructor, models_cfg: ModelsConfig,
                include_teacher_unet: bool = False) -> str:
    """Write a checkpoint bundle (layout: module docstring) to a local folder or an ``s3://`` prefix.

    Locally the folder appears whole (written beside it, then renamed; an existing bundle there is
    replaced, any other non-empty folder refused); on S3 ``geco.json`` is uploaded last."""
    return storage.write_folder(
        str(dest), lambda root: _write_bundle(root, teacher, generator, reconstructor, models_cfg, include_teacher_unet),
        marker=MANIFEST, what="GECO checkpoint")


# ================================================================================================
# Checking and resolving
# ================================================================================================
def _not_a_checkpoint(where: str, root: Path | None = None) -> CheckpointError:
    hint = ""
    if root is not None and root.is_dir():
        if (root / "model_index.json").is_file():
            hint = ("; this looks like a Zero123++ teacher folder: a GECO checkpoint bundles it with a generator "
                    "and a reconstructor (geco.models.bundle.save_bundle)")
        elif (root / "unet" / "config.json").is_file():
            hint = "; this looks like a generator folder: a GECO checkpoint holds it under generator/"
        else:
            names = sorted(p.name for p in root.iterdir())[:8]
            hint = f"; the folder holds: {', '.join(names) if names else 'nothing'}"
    return CheckpointError(f"no {MANIFEST} at {where}: not a GECO checkpoint; expected layout: {EXPECTED_LAYOUT}"
                           f"{hint}. Write one with `geco models init-tiny DEST` or geco.models.bundle.save_bundle.")


def read_manifest(root: str | os.PathLike) -> dict:
    """``geco.json`` of a local bundle folder, validated (format name and version)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise _not_a_checkpoint(str(root), root)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); not a valid GECO checkpoint") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path}: format {got!r}, expected {FORMAT_NAME!r}; not a GECO checkpoint")
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r}; this geco reads version "
                              f"{FORMAT_VERSION} or older (upgrade geco)")
    return manifest


_WHAT = {TEACHER_DIR: "the teacher's encoders/VAE", GENERATOR_DIR: "the one-step generator",
         "reconstructor": "the reconstructor's weights"}


def check_bundle(root: str | os.PathLike) -> dict:
    """Raise :class:`CheckpointError` naming every missing or truncated file of a local bundle;
    return its manifest."""
    root = Path(root)
    manifest = read_manifest(root)
    problems = []
    for rel, size in sorted((manifest.get("files") or {}).items()):
        p = root / rel
        what = _WHAT.get(rel.split("/", 1)[0], "")
        if not p.is_file():
            problems.append(f"missing {rel}" + (f" ({what})" if what else ""))
        elif p.stat().st_size != size:
            problems.append(f"{rel} has {p.stat().st_size} bytes, expected {size} (truncated copy?)")
    for rel in (f"{TEACHER_DIR}/model_index.json", f"{GENERATOR_DIR}/unet/config.json", RECONSTRUCTOR_FILE):
        if not (root / rel).is_file() and not any(rel in p for p in problems):
            problems.append(f"missing {rel} ({_WHAT.get(rel.split('/', 1)[0], '')})")
    if problems:
        raise CheckpointError(f"GECO checkpoint {root} is incomplete: " + "; ".join(problems)
                              + f". Expected layout: {EXPECTED_LAYOUT}")
    return manifest


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else storage.default_cache_dir("checkpoints")


def _find_bundle_root(path: Path) -> Path:
    """``path`` itself, or its single sub-folder holding geco.json (MLflow downloads keep the
    artifact folder's name)."""
    if (path / MANIFEST).is_file() or not path.is_dir():
        return path
    subs = [p for p in path.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
    return subs[0] if len(subs) == 1 else path


def _download_s3(uri: str, cache_dir) -> Path:
    uri = uri.rstrip("/")
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri):
        listed = storage.listdir(uri)
        what = (f"it holds {len(listed)} object(s), e.g. {', '.join(storage.basename(f) for f in listed[:5])}"
                if listed else "nothing is stored under this prefix")
        raise CheckpointError(f"no {MANIFEST} at {uri}: not a GECO checkpoint ({what}); expected layout: "
                              f"{EXPECTED_LAYOUT}")
    try:
        manifest = json.loads(storage.read_text(manifest_uri))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_uri}: unreadable ({e}); not a valid GECO checkpoint") from None
    # one cache folder per saved bundle (its id): a bundle saved again at the same prefix gets a new
    # copy, and the old copy stays whole for whoever still reads it
    key = f"{uri}\0{manifest.get('bundle_id') or manifest.get('created', '')}"
    root = storage.local_copy(uri, cache_dir=_cache_root(cache_dir) / ("s3-" + hashlib.sha256(key.encode()).hexdigest()[:16]))
    log.info("checkpoint %s cached in %s", uri, root)
    return root


def _download_mlflow(uri: str, cache_dir, tracking_uri: str | None) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # the project's runs live where its config tracks them (default sqlite:///mlruns.db), not where
    # MLflow looks by default (./mlflow.db): without an argument or MLFLOW_TRACKING_URI, look there
    mlflow.set_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or TrackingConfig().uri)
    # aliases move: download afresh every time, into a folder of its own
    dst = _cache_root(cache_dir) / "mlflow" / hashlib.sha256(uri.encode()).hexdigest()[:16] / uuid.uuid4().hex[:8]
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
    except MlflowException as e:
        shutil.rmtree(dst, ignore_errors=True)
        msg = str(e.message if hasattr(e, "message") else e).splitlines()[0][:300]
        raise CheckpointError(f"{uri}: MLflow cannot resolve it ({msg}); tracking URI "
                              f"{mlflow.get_tracking_uri()} (set MLFLOW_TRACKING_URI)") from None
    except OSError as e:
        shutil.rmtree(dst, ignore_errors=True)
        raise CheckpointError(f"{uri}: MLflow download failed ({e})") from None
    for old in dst.parent.iterdir():  # keep only the newest download of this URI
        if old != dst:
            shutil.rmtree(old, ignore_errors=True)
    return _find_bundle_root(Path(local))


def resolve_checkpoint(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                       tracking_uri: str | None = None) -> Path:
    """A local folder holding a whole GECO checkpoint for ``uri``: a local path (``file://`` too), an
    ``s3://`` prefix (downloaded into ``cache_dir``, default ``$GECO_CACHE/checkpoints``), or an MLflow
    ``runs:/``, ``models:/name/version``, ``models:/name@alias`` or ``mlflow-artifacts:/`` URI.
    Raises :class:`CheckpointError` saying what is missing."""
    uri = str(uri).strip()
    if not uri:
        raise CheckpointError("empty checkpoint URI")
    if uri.startswith(MLFLOW_SCHEMES):
        root = _download_mlflow(uri, cache_dir, tracking_uri)
        where = uri
    elif storage.is_s3(uri):
        root = _download_s3(uri, cache_dir)
        where = uri
    else:
        root = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
        where = str(root)
        if not root.exists():
            raise CheckpointError(f"{root}: no such checkpoint folder")
        if not root.is_dir():
            raise CheckpointError(f"{root}: a file, not a checkpoint folder; expected layout: {EXPECTED_LAYOUT}")
    if not (root / MANIFEST).is_file():
        raise _not_a_checkpoint(where, root)
    check_bundle(root)
    return root


def bundle_fingerprint(uri: str) -> str:
    """What identifies the bundle at ``uri`` without loading it: ``<uri>#<bundle_id>`` for a local
    folder or an ``s3://`` prefix (a new id per save, so a bundle saved again at the same place
    differs), the URI itself for MLflow URIs or where no ``geco.json`` can be read. For run names
    of stages trained from a bundle (a re-trained input must not resume the old run)."""
    uri = str(uri).strip()
    if not uri or uri.startswith(MLFLOW_SCHEMES):
        return uri
    try:
        manifest = json.loads(storage.read_text(storage.join(uri, MANIFEST)))
    except Exception:  # noqa: BLE001 - unreadable here: the URI alone (loading reports the problem)
        return uri
    return f"{uri}#{manifest.get('bundle_id') or manifest.get('created', '')}"


# ================================================================================================
# Loading
# ================================================================================================
def _upgrade_models(models: dict) -> dict:
    """A stored models section in today's layout: bundles written before reconstructors had a
    ``kind`` kept LGM's architecture fields flat in ``reconstructor`` (now ``reconstructor.lgm``)."""
    rec = dict(models.get("reconstructor") or {})
    flat = {k: rec.pop(k) for k in list(rec) if k in LGMConfig.model_fields}
    if not flat:
        return models
    rec["lgm"] = {**flat, **(rec.get("lgm") or {})}
    return {**models, "reconstructor": rec}


def load_bundle(uri: str | os.PathLike, device: str | torch.device = "cpu",
                cache_dir: str | os.PathLike | None = None, tracking_uri: str | None = None) -> Bundle:
    """Resolve ``uri`` (:func:`resolve_checkpoint`) and load the three components onto ``device``,
    in eval mode. The config is the one stored in ``geco.json`` with weight paths pointing into the
    bundle."""
    from geco.models.generator import OneStepGenerator, generator_config_from_checkpoint, load_generator
    from geco.models.reconstructors import load_reconstructor
    from geco.models.teacher import load_teacher

    root = resolve_checkpoint(uri, cache_dir, tracking_uri)
    manifest = check_bundle(root)
    cfg = validate(ModelsConfig, _upgrade_models(manifest.get("models") or {}), f"{root / MANIFEST}: models")
    has_unet = bool(manifest["components"]["teacher"].get("unet_included", (root / TEACHER_UNET_WEIGHTS).is_file()))
    gen_dir = root / GENERATOR_DIR
    gcfg = generator_config_from_checkpoint(cfg.generator.model_copy(update={"pretrained": str(gen_dir)}), gen_dir)
    rcfg = cfg.reconstructor.model_copy(update={"pretrained": str(root / RECONSTRUCTOR_FILE)})
    if has_unet:
        tcfg = cfg.teacher.model_copy(update={"pretrained": str(root / TEACHER_DIR), "unet": ""})
        teacher = load_teacher(tcfg)
        generator = load_generator(gcfg, teacher)
    else:
        # read the generator's UNet once, as the teacher's UNet override, then hand it to the
        # generator and leave the teacher a stand-in that keeps the config and refuses to run
        tcfg = cfg.teacher.model_copy(update={"pretrained": str(root / TEACHER_DIR),
                                              "unet": str(gen_dir / "unet")})
        teacher = load_teacher(tcfg)
        generator = OneStepGenerator(teacher, teacher.unet, gcfg)
        teacher.unet = MissingUNet(generator.unet.config, f"{uri}", generator.unet.dtype)
        tcfg = tcfg.model_copy(update={"unet": ""})
        teacher.cfg = tcfg
    reconstructor = load_reconstructor(rcfg)
    bundle = Bundle(teacher, generator, reconstructor, cfg.model_copy(update={"teacher": tcfg, "generator": gcfg,
                                                                               "reconstructor": rcfg}),
                    root=root, manifest=manifest)
    return bundle.to(device).eval()


# ================================================================================================
# Tiny bundles
# ================================================================================================
def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_models_config(overrides: list[str] | None = None, base: dict | None = None) -> ModelsConfig:
    """:data:`TINY_MODELS` (under ``base``, a models section from a config file, and the
    ``overrides``: ``teacher.tile_size=64`` or ``models.teacher.tile_size=64``)."""
    data = _deep_merge(json.loads(json.dumps(TINY_MODELS)), base or {})
    norm = []
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        norm.append(item.strip()[len("models."):] if key.startswith("models.") else item.strip())
    data = apply_overrides(data, norm)
    return validate(ModelsConfig, data, "tiny models" + (" + --set " + " ".join(overrides) if overrides else ""))


def init_tiny_bundle(dest: str | os.PathLike, models_cfg: ModelsConfig | None = None, seed: int = 0,
                     include_teacher_unet: bool = False) -> str:
    """Write a randomly initialised bundle (tiny teacher, generator = copy of its UNet, reconstructor)
    sized by ``models_cfg`` (default :func:`tiny_models_config`). Deterministic for a ``seed``."""
    from geco.models.generator import OneStepGenerator
    from geco.models.reconstructors import build_reconstructor
    from geco.models.teacher import build_tiny_teacher

    cfg = models_cfg or tiny_models_config()
    if cfg.teacher.pretrained or cfg.reconstructor.pretrained or cfg.generator.pretrained:
        raise ValueError("init-tiny builds random models: leave models.*.pretrained empty")
    teacher = build_tiny_teacher(cfg.teacher, seed=seed)
    generator = OneStepGenerator.from_teacher(teacher, cfg.generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        reconstructor = build_reconstructor(cfg.reconstructor)
    return save_bundle(dest, teacher, generator, reconstructor, cfg, include_teacher_unet=include_teacher_unet)


# ================================================================================================
# MLflow
# ================================================================================================
def log_bundle(bundle_dir: str | os.PathLike, artifact_path: str = "checkpoint") -> str:
    """Log a local bundle folder as artifacts of the active MLflow run (one is started if none is
    active); returns its ``runs:/<run_id>/<artifact_path>`` URI."""
    import mlflow

    check_bundle(bundle_dir)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    run = mlflow.active_run() or mlflow.start_run()
    mlflow.log_artifacts(str(bundle_dir), artifact_path=artifact_path)
    return f"runs:/{run.info.run_id}/{artifact_path}"


def register_bundle(runs_uri: str, name: str = "geco", alias: str | None = None,
                    tags: dict[str, str] | None = None):
    """Register a logged bundle (``runs:/<run_id>/<path>``) as a new version of registered model
    ``name`` (created if needed), optionally pointing ``alias`` at it; returns the ModelVersion.
    Uses ``MlflowClient.create_model_version`` because MLflow 3's ``register_model`` accepts only
    LoggedModels (see the module docstring)."""
    from mlflow import MlflowClient

    from geco.registry import create_version  # lazy, as mlflow: the registry side of a bundle

    if not runs_uri.startswith("runs:/"):
        raise ValueError(f"expected a runs:/<run_id>/<path> URI, got {runs_uri!r}")
    run_id = runs_uri[len("runs:/"):].split("/", 1)[0]
    client = MlflowClient()
    version = create_version(client, name, runs_uri, run_id=run_id, tags=tags or {})
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version
