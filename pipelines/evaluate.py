"""DAG stage `evaluate`: the GSO protocol on every model under test -> a results folder, a report, MLflow.

    inputs: EvaluateInputs(models {name: URI}, dataset_uri)                      (pipelines.stage)
        the DAG: stage1's (and stage2's) bundle, the teacher stage 1 distilled (as "teacher" and
        "teacher_1step"), the shards it trained on; `geco evaluate`: --checkpoint name=URI, --gso
    objects   a Google Scanned Objects folder (`evaluate.gso_uri`, local or s3://; `evaluate.objects`
              picks folder names, default all), or - when empty - a few procedural objects the stage
              writes in the GSO layout itself (the demo; no download)
    checks    before any work, each one line (EvaluateError): a folder without GSO meshes, an unknown
              object name, a missing texture, a model URI that does not resolve
    leakage   evaluation objects vs the training manifest at dataset_uri (geco.eval.leakage)
    ground truth  Ray Data + the render stage's Blender actors (pipelines.render.RenderActor) at the
              protocol's cameras (geco.eval.protocol: input 0/0, 6 Zero123++ poses, 15-view orbit, 16
              geometry cameras), with depth; cached under <output_uri>/gt/ by the object's content hash
              and the views' settings, so a re-run renders only what changed
    models    Ray Data, one actor (evaluate.num_gpus / num_cpus) holding every model under test:
              per object and model, Gaussians from the input view (seconds to generate and to
              reconstruct apart), scored against the ground truth (geco.eval.protocol.score_object),
              a turntable, the .ply, one image grid per object
    results   <output_uri>/results/ (geco.eval.results: summary.json, objects.csv, images/, turntables/,
              ply/, plots/) + report/index.html (geco.eval.report.write_report, when present)
    MLflow    a `<name>/evaluate` run: params (the evaluate section, the models), metrics
              `<model>/gso/<view set>/<metric>` for every model and `gso/<view set>/<metric>` unprefixed
              for the primary model (stage2, else stage1, else the first: what `register` judges),
              lineage tags (git commit, config hash, dataset + manifest, every checkpoint URI,
              leakage), the results folder as artifacts (`evaluation/`)

Re-running with unchanged inputs (same objects, same checkpoints, same settings, same training
manifest) does nothing: the results folder records the evaluation's hash, and a matching one is
returned as it is, without an MLflow run.

A teacher model URI may be a GECO bundle that holds the teacher UNet (`stage1.bundle_teacher_unet`)
- then its own reconstructor is used - or a Zero123++ teacher folder / pretrain output; then the
reconstructor is the one of the stage2/stage1 bundle under test (so the teacher rows differ from the
generator rows only in how the 6 views are made), else `models.reconstructor.pretrained` / the
pretrain output.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geco import storage, tracking
from geco.config import EVAL_MODEL_NAMES, GecoConfig, SourceConfig
from geco.data import shards
from geco.eval.leakage import check_leakage
from geco.eval.protocol import VIEW_SETS, Protocol
from geco.eval.results import ResultsWriter, aggregate, rows_for
from geco.models.teacher import TINY as TINY_TEACHER
from geco.sources import ObjectRef, list_objects
from geco.tracking import start_run
from geco.train.loop import config_hash
from pipelines.cluster import init_ray
from pipelines.render import pack_members, sample_hash, unpack_members
from pipelines.stage import EvaluateInputs, StageOutputs

STAGE = "evaluate"
PRIMARY_ORDER = ("stage2", "stage1", "teacher", "teacher_1step")  # whose metrics are logged unprefixed
DEMO_DIR = "gso-demo"
DEMO_INDEX0 = 1000  # demo objects are procedural indices 1000+: never the training set's 0..N
log = logging.getLogger(__name__)


class EvaluateError(ValueError):
    """Bad evaluation input a user can fix (the message names it and the fix)."""


@dataclass
class EvaluateOutputs(StageOutputs):
    """:class:`~pipelines.stage.StageOutputs` (``uris``: "results" folder, "report" index.html) plus
    ``metrics`` (model -> {"gso/<view set>/<metric>": value or None}) and ``leakage``."""

    stage: str = STAGE
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    leakage: dict = field(default_factory=dict)
    objects: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # object -> why it has no ground truth
    primary: str = ""
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def results_uri(self) -> str | None:
        return self.uris.get("results")

    @property
    def report_uri(self) -> str | None:
        return self.uris.get("report")

    def primary_metrics(self) -> dict[str, float]:
        """The primary model's available metrics (what `register` compares)."""
        return {k: v for k, v in self.metrics.get(self.primary, {}).items() if v is not None}

    def summary(self) -> str:
        head = "nothing to do (inputs unchanged); " if not self.did_work else ""
        lines = [f"evaluate: {head}{len(self.objects)} object(s), {len(self.metrics)} model(s) in {self.seconds:.1f} s"
                 + (f"; {len(self.failed)} object(s) without ground truth" if self.failed else "")]
        for m, vals in self.metrics.items():
            parts = []
            for vs in VIEW_SETS:
                p, s, lp = (vals.get(f"gso/{vs}/{k}") for k in ("psnr", "ssim", "lpips"))
                parts.append(f"{vs} PSNR {_fmt(p, 2)} SSIM {_fmt(s, 3)} LPIPS {_fmt(lp, 3)}")
            geo = f"CD {_fmt(vals.get('gso/orbit/cd'), 4)} vIoU {_fmt(vals.get('gso/orbit/viou'), 3)} " \
                  f"F {_fmt(vals.get('gso/orbit/fscore'), 3)}"
            secs = (vals.get("gso/orbit/seconds_generate") or 0) + (vals.get("gso/orbit/seconds_reconstruct") or 0)
            lines.append(f"  {m:<13} {'; '.join(parts)}; {geo}; {secs:.2f} s/object")
        if self.leakage:
            lines.append(f"  leakage: {self.leakage.get('detail', '')}")
        for k, why in self.unavailable.items():
            lines.append(f"  {k}: unavailable ({why[:160]})")
        for k, uri in sorted(self.uris.items()):
            lines.append(f"  {k}: {uri}")
        if self.mlflow_run_id:
            lines.append(f"  mlflow run: {self.mlflow_run_id}")
        return "\n".join(lines)


def _fmt(v, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# objects
# ---------------------------------------------------------------------------------------------
def demo_objects(cfg: GecoConfig) -> str:
    """The demo's GSO folder: ``evaluate.demo_objects`` procedural objects in the GSO layout (one with
    its texture beside the mesh, the others where GSO keeps it), written once; returns its path."""
    from geco.data.procedural import make_gso_object

    ev = cfg.evaluate
    base = ev.output_uri if not storage.has_scheme(ev.output_uri) else str(storage.default_cache_dir("evaluate"))
    root = Path(storage.absolute_uri(base)) / DEMO_DIR
    for i in range(ev.demo_objects):
        name = f"demo_{i:02d}"
        if not (root / name / "meshes" / "model.obj").is_file():
            make_gso_object(DEMO_INDEX0 + i, cfg.render.seed, root, name, texture_beside=(i % 2 == 1))
    return str(root)


def list_gso(cfg: GecoConfig, uri: str) -> list[ObjectRef]:
    """The objects to evaluate, in name order; EvaluateError for a folder without GSO objects, an
    unknown name in ``evaluate.objects``, or an object whose texture is missing."""
    listing = list_objects(SourceConfig(kind="gso", uri=uri))
    refs, rejected = listing.objects, listing.rejected
    if not refs:
        why = f" ({rejected[0].reason})" if rejected else ""
        raise EvaluateError(f"evaluate.gso_uri={uri}: no objects in the Google Scanned Objects layout "
                            f"(<name>/meshes/model.obj){why}; point it at a GSO folder")
    by_name = {r.extra.get("name", r.object_id): r for r in refs}
    wanted = list(cfg.evaluate.objects) or sorted(by_name)
    bad = {r.extra.get("name"): r.reason for r in rejected}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        why = "; ".join(f"{n}: {bad[n]}" for n in unknown if n in bad)
        raise EvaluateError(f"evaluate.objects: {', '.join(unknown)} not usable in {uri}"
                            + (f" ({why})" if why else f" (it has: {', '.join(sorted(by_name)[:12])})")
                            + "; fix the folder or the list")
    if rejected and not cfg.evaluate.objects:
        log.warning("evaluate: %d folder(s) of %s are not GSO objects and are left out, e.g. %s",
                    len(rejected), uri, rejected[0].reason)
    chosen = [by_name[n] for n in wanted]
    missing = [(r.extra.get("name"), t) for r in chosen for t in r.extra.get("missing_textures", [])]
    missing += [(r.extra.get("name"), m) for r in chosen for m in r.extra.get("missing_materials", [])]
    if missing:
        what = ", ".join(f"{n}: {t!r}" for n, t in missing[:5])
        raise EvaluateError(f"evaluate.gso_uri={uri}: missing texture/material file(s) ({what}) named by "
                            "meshes/model.mtl (looked beside the mesh and in materials/textures/); restore them "
                            "or leave the object out of evaluate.objects")
    return chosen


# ---------------------------------------------------------------------------------------------
# models under test
# ---------------------------------------------------------------------------------------------
def _fingerprint(root: Path) -> str:
    """What identifies a local model folder or file: its files' paths, sizes and mtimes."""
    p = Path(root)
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    return config_hash([(str(f.relative_to(p)) if f != p else f.name, f.stat().st_size, f.stat().st_mtime_ns)
                        for f in files])


def resolve_models(cfg: GecoConfig, models: dict[str, str]) -> dict[str, dict]:
    """``{name: spec}`` for the actor, checked before any work (each problem: EvaluateError naming the
    model, its URI and the fix). A spec: ``kind`` generator|teacher, ``uri``, ``steps`` and, for a
    teacher folder, ``teacher`` (the folder) and ``reconstructor`` (a bundle URI or a .safetensors)."""
    from geco.models.bundle import CheckpointError, read_manifest, resolve_checkpoint
    from pipelines.stage1 import default_inputs, teacher_folder
    from pipelines.training import TrainSetupError

    if not models:
        raise EvaluateError("no models to evaluate: give --checkpoint NAME=URI (names: "
                            f"{', '.join(EVAL_MODEL_NAMES)}) or set evaluate.models")
    unknown = sorted(set(models) - set(EVAL_MODEL_NAMES))
    if unknown:
        raise EvaluateError(f"model name(s) {', '.join(unknown)}: use {', '.join(EVAL_MODEL_NAMES)}")
    track = cfg.tracking.uri if cfg.tracking.enabled else None
    specs: dict[str, dict] = {}
    bundles: dict[str, Path] = {}

    def bundle_root(name: str, uri: str) -> Path | None:
        try:
            return resolve_checkpoint(uri, tracking_uri=track)
        except CheckpointError as e:
            if name in ("stage1", "stage2") or not _local_folder(uri):
                raise EvaluateError(f"model {name}={uri} does not resolve: {e}") from None
            return None  # a teacher folder, not a bundle

    for name in [n for n in EVAL_MODEL_NAMES if n in models]:
        uri = models[name]
        if not uri:
            raise EvaluateError(f"model {name} has an empty URI; give a bundle, runs:/ or models:/ URI")
        root = bundle_root(name, uri)
        steps = cfg.evaluate.teacher_steps if name == "teacher" else 1
        if name in ("stage1", "stage2"):
            bundles[name] = root
            specs[name] = {"kind": "generator", "uri": uri, "fingerprint": _fingerprint(root)}
            continue
        if root is not None:
            comp = read_manifest(root).get("components", {}).get("teacher", {})
            if not comp.get("unet_included", (root / "teacher/unet/diffusion_pytorch_model.safetensors").is_file()):
                raise EvaluateError(f"model {name}={uri}: this bundle has no teacher UNet (an inference bundle); "
                                    "give the teacher folder (e.g. the pretrain output) or a bundle exported with "
                                    "stage1.bundle_teacher_unet: true")
            specs[name] = {"kind": "teacher", "uri": uri, "steps": steps, "fingerprint": _fingerprint(root)}
            continue
        try:
            folder = teacher_folder(uri, f"model {name}")
        except TrainSetupError as e:
            raise EvaluateError(str(e).replace("run `geco train pretrain` first or give another --teacher",
                                               "give a GECO bundle, a Zero123++ folder or a pretrain output")) from None
        specs[name] = {"kind": "teacher", "uri": uri, "teacher": folder, "steps": steps}
    for name, spec in specs.items():
        if spec["kind"] != "teacher" or "teacher" not in spec:
            continue
        with_rec = next((n for n in ("stage2", "stage1") if n in bundles), None)
        if with_rec:
            spec["reconstructor"], rec_fp = models[with_rec], specs[with_rec]["fingerprint"]
        else:
            try:
                rec = default_inputs(cfg).reconstructor_uri
            except TrainSetupError as e:
                raise EvaluateError(f"model {name}: {e}") from None
            if not rec:
                raise EvaluateError(f"model {name}={models[name]}: no reconstructor to pair the teacher with; also "
                                    "evaluate a stage1/stage2 bundle, or set models.reconstructor.pretrained")
            spec["reconstructor"], rec_fp = rec, rec
        spec["fingerprint"] = config_hash(_fingerprint(Path(spec["teacher"])) if _local_folder(spec["teacher"])
                                          else spec["teacher"], rec_fp)
    return specs


def _local_folder(uri: str) -> bool:
    return not storage.has_scheme(uri) or uri.startswith("file://")


class ModelRunner:
    """Loads every model under test once (in the evaluation actor) and runs them by name."""

    def __init__(self, cfg: GecoConfig, specs: dict[str, dict]):
        from geco.eval.models import GeneratorModel, TeacherModel
        from geco.generate import pick_device
        from geco.models.bundle import load_bundle
        from geco.models.reconstructors import load_reconstructor
        from geco.models.teacher import load_teacher

        self.device = pick_device(cfg.evaluate.device)
        track = cfg.tracking.uri if cfg.tracking.enabled else None
        bundles: dict[str, Any] = {}

        def bundle(uri: str):
            if uri not in bundles:
                bundles[uri] = load_bundle(uri, self.device, tracking_uri=track)
            return bundles[uri]

        self.models: dict[str, Any] = {}
        for name, spec in specs.items():
            if spec["kind"] == "generator":
                self.models[name] = GeneratorModel(bundle(spec["uri"]))
            elif "teacher" not in spec:
                b = bundle(spec["uri"])
                self.models[name] = TeacherModel(b.teacher, b.reconstructor, spec["steps"])
            else:
                # the configured UNet override (models.teacher.unet, e.g. InstantMesh's) applies to the folder
                teacher = load_teacher(cfg.models.teacher.model_copy(update={"pretrained": spec["teacher"]}))
                teacher.to(self.device).eval()
                rec_uri = spec["reconstructor"]
                if rec_uri.endswith(".safetensors"):
                    rec = load_reconstructor(cfg.models.reconstructor.model_copy(update={"pretrained": rec_uri}),
                                             device=self.device).eval()
                else:
                    rec = bundle(rec_uri).reconstructor
                self.models[name] = TeacherModel(teacher, rec, spec["steps"])


# ---------------------------------------------------------------------------------------------
# ground truth
# ---------------------------------------------------------------------------------------------
def gt_render_config(cfg: GecoConfig):
    """The render settings of the ground truth: the project's Blender settings, with depth, no normals."""
    return cfg.render.model_copy(update={"depth": True, "normals": False})


def gt_cameras(protocol: Protocol) -> list[dict]:
    return [c.to_dict() for c in protocol.cameras()]


def gt_hash(ref: ObjectRef, cfg: GecoConfig, protocol: Protocol) -> str:
    """The object's bytes + the pixel-relevant render settings + the cameras."""
    return sample_hash(ref.content_hash, config_hash(gt_render_config(cfg).settings_hash(), gt_cameras(protocol)))


def gt_uri(cfg: GecoConfig, ref: ObjectRef, h: str) -> str:
    return storage.join(storage.absolute_uri(cfg.evaluate.output_uri), "gt", f"{ref.object_id}-{h}.tar")


def render_ground_truth(cfg: GecoConfig, refs: list[ObjectRef], protocol: Protocol) -> tuple[dict, dict, int]:
    """``({object_id: gt URI}, {object_id: why it failed}, rendered now)``: renders only the objects
    whose ground truth is not cached yet, with the render stage's Blender actors through Ray Data."""
    import ray

    from pipelines.render import RenderActor

    uris = {r.object_id: gt_uri(cfg, r, gt_hash(r, cfg, protocol)) for r in refs}
    todo = [r for r in refs if not storage.exists(uris[r.object_id])]
    failed: dict[str, str] = {}
    if not todo:
        return uris, failed, 0
    init_ray(cfg.ray.address)
    cams = json.dumps(gt_cameras(protocol))
    ds = ray.data.from_items([{"ref": r.to_json(), "cameras": cams} for r in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        RenderActor, batch_size=1,
        fn_constructor_kwargs={"render_json": gt_render_config(cfg).model_dump_json(), "cache_dir": cfg.cache.dir,
                               "cache_max_gb": cfg.cache.max_gb},
        compute=ray.data.ActorPoolStrategy(size=min(cfg.ray.num_renderers, len(todo))),
        num_cpus=cfg.ray.cpus_per_renderer, num_gpus=cfg.ray.gpus_per_renderer or None)
    done = 0
    for row in ds.iter_rows():
        oid = row["object_id"]
        if row["ok"]:
            storage.write_bytes(uris[oid], row["sample"])
            done += 1
        else:
            failed[oid] = (row["reason"] or "render failed").splitlines()[0][:300]
    for oid in failed:
        uris.pop(oid, None)
    return uris, failed, done


def decode_gt(blob: bytes, object_id: str) -> dict:
    from geco.data import schema

    members = unpack_members(blob)
    return schema.decode_sample({"__key__": object_id, **members}, background=(1.0, 1.0, 1.0), with_normals=False)


# ---------------------------------------------------------------------------------------------
# the models under test, in a Ray actor
# ---------------------------------------------------------------------------------------------
def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _gif(frames: list[np.ndarray]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    imgs = [Image.fromarray(f) for f in frames]
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=max(20, 2000 // len(imgs)),
                 loop=0, disposal=2)
    return buf.getvalue()


class ObjectEvaluator:
    """Ray Data callable class: one row per object (``object_id``, ``gt_uri``, ``seed``) -> its scores
    for every model (JSON), the image grid (PNG) and the files (``ply/<model>.ply``,
    ``turntables/<model>.gif``, packed as a tar)."""

    def __init__(self, cfg_json: str, specs_json: str):
        import torch

        from geco.eval.image_metrics import ImageMetrics

        self.cfg = GecoConfig.model_validate_json(cfg_json)
        ev = self.cfg.evaluate
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(round(ev.num_cpus))))
        self.protocol = Protocol.from_config(ev, self.cfg.render)
        self.runner = ModelRunner(self.cfg, json.loads(specs_json))
        self.metrics = ImageMetrics.load("alex", ev.lpips_backbone_weights, ev.lpips_linear_weights,
                                         device=self.runner.device)

    def evaluate(self, object_id: str, blob: bytes, seed: int) -> dict:
        from geco.eval.protocol import score_object
        from geco.eval.results import object_grid
        from geco.export import save_ply
        from geco.generate import render_turntable

        ev = self.cfg.evaluate
        gt = decode_gt(blob, object_id)
        files: dict[str, bytes] = {}
        scores, renders = {}, {}
        for name, model in self.runner.models.items():
            out = model(gt["cond_rgb"], seed)
            s, r = score_object(out.gaussians, gt, self.protocol, self.metrics)
            scores[name] = {"scores": s, "seconds": {"seconds_generate": out.seconds_generate,
                                                      "seconds_reconstruct": out.seconds_reconstruct}}
            renders[name] = r
            g = out.gaussians
            buf = io.BytesIO()
            save_ply(buf, g.means, g.quats, g.scales, g.opacities, g.rgb)
            files[f"ply/{name}.ply"] = buf.getvalue()
            if ev.turntable_frames:
                files[f"turntables/{name}.gif"] = _gif(render_turntable(g, ev.turntable_frames, ev.turntable_size))
        grid = object_grid(gt["cond_rgb"], {vs: gt[vs]["rgb"] for vs in VIEW_SETS}, renders, VIEW_SETS)
        return {"object_id": object_id, "result": json.dumps({"models": scores, "unavailable": self.metrics.unavailable}),
                "grid": _png(grid), "files": pack_members(files)}

    def __call__(self, batch: dict) -> dict:
        rows = [self.evaluate(oid, storage.read_bytes(uri), int(seed))
                for oid, uri, seed in zip(batch["object_id"], batch["gt_uri"], batch["seed"])]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


# ---------------------------------------------------------------------------------------------
# lineage, publishing
# ---------------------------------------------------------------------------------------------
def _manifests(dataset_uri: str) -> list[dict]:
    if not dataset_uri:
        return []
    try:
        return [shards.read_manifest(dataset_uri, v) for v in shards.list_manifest_versions(dataset_uri)]
    except FileNotFoundError:
        return []


def _publish(local: Path, uri: str) -> None:
    """Copy a local results folder to an s3:// prefix (summary.json last: its presence means complete)."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "summary.json")
    for p in files:
        storage.upload(p, storage.join(uri, str(p.relative_to(local))))


def _swap_in(new: Path, final: Path) -> Path:
    """Put the finished folder ``new`` at ``final``, replacing an earlier one (removed afterwards)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _write_report(results_dir: Path) -> Path | None:
    try:
        from geco.eval.report import write_report
    except ImportError:
        log.info("evaluate: no report page (geco.eval.report is not installed in this checkout); results in %s",
                 results_dir)
        return None
    return Path(write_report(results_dir))


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def default_inputs(cfg: GecoConfig, models: dict[str, str] | None = None, dataset_uri: str | None = None) -> EvaluateInputs:
    """``evaluate.models`` updated with ``models`` (the command line's, or what the DAG's stages made)."""
    return EvaluateInputs(models={**cfg.evaluate.models, **(models or {})},
                          dataset_uri=cfg.dataset.uri if dataset_uri is None else dataset_uri)


def dag_models(cfg: GecoConfig, stage1=None, stage2=None) -> dict[str, str]:
    """The models under test the DAG hands over: stage2's and stage1's bundles (their outputs in this
    run, else a bundle already under ``<stage>.output_uri/bundle``) and the teacher stage 1 distilled
    (its input in this run, else :func:`pipelines.stage1.default_inputs`'s), as "teacher" (K steps)
    and "teacher_1step". A tiny random teacher ("" or "tiny") is not evaluated."""
    from pipelines.stage1 import default_inputs as stage1_inputs

    models: dict[str, str] = {}
    for name, out in (("stage1", stage1), ("stage2", stage2)):
        uri = getattr(out, "bundle_uri", None)
        if not uri and out is None:
            section = getattr(cfg, name, None)
            cand = storage.join(storage.absolute_uri(section.output_uri), "bundle") if section is not None else ""
            uri = cand if cand and storage.exists(storage.join(cand, "geco.json")) else None
        if uri:
            models[name] = uri
    teacher = getattr(stage1, "teacher_uri", None)
    if stage1 is None:
        try:
            teacher = stage1_inputs(cfg).teacher_uri
        except Exception as e:  # noqa: BLE001 - no teacher to evaluate is not an error here
            log.info("evaluate: no teacher to evaluate (%s)", e)
            teacher = ""
    if teacher and teacher != TINY_TEACHER:
        models["teacher"] = models["teacher_1step"] = teacher
    return {k: v for k, v in models.items() if k not in cfg.evaluate.models}  # the config's entries win


def _primary(models) -> str:
    return next((m for m in PRIMARY_ORDER if m in models), next(iter(models), ""))


def run(cfg: GecoConfig, inputs: EvaluateInputs | None = None, *, parent_run_id: str | None = None) -> EvaluateOutputs:
    """Evaluate ``inputs.models`` on the GSO objects of ``cfg.evaluate`` (module docstring)."""
    import ray

    t0 = time.perf_counter()
    inputs = inputs or default_inputs(cfg)
    ev = cfg.evaluate
    out_uri = storage.absolute_uri(ev.output_uri)
    storage.check_writable(out_uri)
    gso = ev.gso_uri or demo_objects(cfg)
    if storage.is_s3(gso):
        storage.check_readable(gso)
    refs = list_gso(cfg, gso)
    specs = resolve_models(cfg, dict(inputs.models))
    protocol = Protocol.from_config(ev, cfg.render)
    names = {r.object_id: r.extra.get("name", r.object_id) for r in refs}

    manifests = _manifests(inputs.dataset_uri)
    leakage = check_leakage([{"object_id": r.object_id, "name": names[r.object_id], "content_hash": r.content_hash}
                             for r in refs], manifests, sample_hash, inputs.dataset_uri)
    if not leakage["clean"]:
        log.warning("evaluate: %s", leakage["detail"])

    runtime = {"device", "num_gpus", "num_cpus", "models", "gso_uri", "output_uri"}
    eval_hash = config_hash(ev.model_dump(mode="json", exclude=runtime), protocol.describe(),
                            gt_render_config(cfg).settings_hash(), {n: s["fingerprint"] for n, s in specs.items()},
                            {r.object_id: r.content_hash for r in refs}, leakage)
    results_uri = storage.join(out_uri, "results")
    prior = _prior(results_uri, eval_hash)
    if prior is not None:
        return prior

    gt_uris, failed, rendered = render_ground_truth(cfg, refs, protocol)
    if not gt_uris:
        raise EvaluateError(f"evaluate: no object of {gso} rendered: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    order = [r.object_id for r in refs if r.object_id in gt_uris]
    init_ray(cfg.ray.address)
    t_models = time.perf_counter()
    ds = ray.data.from_items([{"object_id": oid, "gt_uri": gt_uris[oid], "seed": ev.seed + i}
                              for i, oid in enumerate(order)], override_num_blocks=len(order))
    ds = ds.map_batches(ObjectEvaluator, batch_size=1,
                        fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "specs_json": json.dumps(specs)},
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=ev.num_cpus, num_gpus=ev.num_gpus or None)

    # a fresh folder: written whole, then put in place of an earlier evaluation's (which stays until then)
    if storage.is_s3(out_uri):
        staging = Path(tempfile.mkdtemp(prefix="geco-eval-"))
    else:
        Path(out_uri).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".results.tmp-", dir=out_uri))
        staging.chmod(0o755)  # mkdtemp's 0700 would stay on the published folder
    writer = ResultsWriter(staging)
    rows: list[dict] = []
    unavailable: dict[str, str] = {}
    for row in ds.iter_rows():
        oid = row["object_id"]
        obj = names[oid]
        res = json.loads(row["result"])
        unavailable.update(res["unavailable"])
        for model, r in res["models"].items():
            rows += rows_for(obj, model, r["scores"], r["seconds"], VIEW_SETS)
        files = unpack_members(row["files"])
        for rel, data in files.items():
            kind, fname = rel.split("/", 1)
            dest = staging / kind / obj / fname
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        (staging / "images").mkdir(exist_ok=True)
        (staging / "images" / f"{obj}.png").write_bytes(row["grid"])
    model_seconds = time.perf_counter() - t_models
    models = [m for m in EVAL_MODEL_NAMES if m in specs]
    rows.sort(key=lambda r: (r["object"], models.index(r["model"]), VIEW_SETS.index(r["view_set"])))
    metrics, missing = aggregate(rows, models, VIEW_SETS)
    primary = _primary(models)
    seconds = time.perf_counter() - t0
    commit, dirty = tracking.git_state()
    lineage = {"git_commit": commit + ("-dirty" if dirty == "true" else ""), "config_hash": tracking.config_hash(cfg),
               "evaluation_hash": eval_hash,
               "dataset_uri": inputs.dataset_uri,
               "manifest_uri": shards.manifest_uri(inputs.dataset_uri, manifests[-1]["version"]) if manifests else "",
               "checkpoints": dict(inputs.models), "gso_uri": gso}
    summary = {
        "objects": [names[o] for o in order], "models": models, "view_sets": list(VIEW_SETS), "metrics": metrics,
        "primary_model": primary, "unavailable": unavailable, "missing": missing,
        "leakage": leakage, "failed": {names[k]: v for k, v in failed.items()},
        "scale": {"objects": len(order), "gso": gso, "input_resolution": ev.input_resolution,
                  "resolution": ev.resolution, "teacher_steps": ev.teacher_steps, "protocol": protocol.describe(),
                  "render_samples": cfg.render.blender.samples,
                  "how": "Gaussians rasterized at every camera (white background); depth = expected z-depth of the "
                         "splats where opacity > 0.5; occupancy = depth carving at the geometry cameras, ground "
                         "truth alike (geco/eval/geometry.py)"},
        "seconds": seconds, "seconds_models": model_seconds, "gt_rendered": rendered,
        "objects_per_min": 60 * len(order) / max(model_seconds, 1e-9),
        "lineage": lineage, "evaluation_hash": eval_hash,
        "attribution": "Google Scanned Objects, Google LLC, CC BY 4.0" if ev.gso_uri else
                       "procedural objects in the GSO layout (geco.data.procedural), made by the project",
    }
    writer.finish(rows, summary, plot=ev.plot)
    if storage.is_s3(out_uri):
        report = _write_report(staging)
        _publish(staging, results_uri)
    else:
        staging = _swap_in(staging, Path(results_uri))
        report = _write_report(staging)
    uris = {"results": results_uri}
    if report is not None:
        uris["report"] = storage.join(results_uri, str(report.relative_to(staging)))
    result = EvaluateOutputs(uris=uris, metrics=metrics, leakage=leakage, objects=[names[o] for o in order],
                             failed={names[k]: v for k, v in failed.items()}, primary=primary,
                             unavailable=unavailable, did_work=True, seconds=seconds)
    _track(cfg, inputs, result, summary, staging, parent_run_id)
    result.seconds = time.perf_counter() - t0
    return result


def _prior(results_uri: str, eval_hash: str) -> EvaluateOutputs | None:
    """The earlier evaluation with this hash, or None."""
    summary_uri = storage.join(results_uri, "summary.json")
    if not storage.exists(summary_uri):
        return None
    try:
        s = json.loads(storage.read_text(summary_uri))
    except (ValueError, OSError):
        return None
    if s.get("evaluation_hash") != eval_hash:
        return None
    uris = {"results": results_uri}
    report = storage.join(results_uri, "report", "index.html")
    if storage.exists(report):
        uris["report"] = report
    metrics = {m: s["metrics"][m] for m in s.get("models", []) if m in s["metrics"]}
    return EvaluateOutputs(uris=uris, metrics=metrics, leakage=s["leakage"], objects=s["objects"],
                           failed=s.get("failed", {}), primary=s.get("primary_model", ""),
                           unavailable=s.get("unavailable", {}), did_work=False,
                           mlflow_run_ids={STAGE: s["mlflow_run_id"]} if s.get("mlflow_run_id") else {})


def _track(cfg: GecoConfig, inputs: EvaluateInputs, result: EvaluateOutputs, summary: dict, results_dir: Path,
           parent_run_id: str | None) -> None:
    """The `<name>/evaluate` MLflow run (module docstring); records its id in summary.json."""
    lineage = summary["lineage"]
    with start_run(cfg.tracking, run_name=f"{cfg.name}/{STAGE}", parent_run_id=parent_run_id,
                   tags={"geco.stage": STAGE}) as tracker:
        tracker.log_params({"evaluate": cfg.evaluate.model_dump(mode="json", exclude={"models"}),
                            **{f"evaluate.model.{k}": v for k, v in inputs.models.items()}})
        values: dict[str, float] = {}
        for model, vals in result.metrics.items():
            for k, v in vals.items():
                if v is not None:
                    values[f"{model}/{k}"] = v
                    if model == result.primary:
                        values[k] = v
        values.update({"seconds": summary["seconds"], "objects": len(result.objects),
                       "objects_per_min": summary["objects_per_min"], "leakage_clean": float(result.leakage["clean"])})
        tracker.log_metrics(values)
        tracker.set_tags(tracking.lineage_tags(cfg, dataset_uri=inputs.dataset_uri or None,
                                               inputs={f"checkpoint.{k}": v for k, v in inputs.models.items()}))
        tracker.set_tags({"geco.gso_uri": lineage["gso_uri"], "geco.evaluate.primary_model": result.primary,
                          "geco.evaluate.leakage": "clean" if result.leakage["clean"] else result.leakage["detail"][:5000],
                          **{f"geco.checkpoint.{k}": v for k, v in inputs.models.items()},
                          **{f"geco.evaluate.unavailable.{k}": v[:5000] for k, v in result.unavailable.items()}})
        if tracker.run_id:
            result.mlflow_run_ids[STAGE] = tracker.run_id
            summary["mlflow_run_id"] = tracker.run_id
            summary_path = results_dir / "summary.json"
            summary_path.write_text(json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n")
            if storage.is_s3(storage.absolute_uri(cfg.evaluate.output_uri)):
                storage.upload(summary_path, storage.join(result.uris["results"], "summary.json"))
        tracker.log_artifacts(results_dir, "evaluation")
    log.info("evaluate: %s", result.summary().splitlines()[0])


__all__ = ["EvaluateError", "EvaluateOutputs", "ObjectEvaluator", "dag_models", "default_inputs", "demo_objects",
           "list_gso", "render_ground_truth", "resolve_models", "run"]
