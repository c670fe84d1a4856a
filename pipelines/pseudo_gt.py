"""DAG stage `pseudo_gt`: render shards in -> pseudo ground-truth shards out, for stage 2.

    inputs: PseudoGTInputs(dataset_uri, teacher_uri, reconstructor_uri)            (pipelines.stage)
        the DAG: what stage 1 distilled and bundled (pretrain's outputs, else models.*.pretrained);
        `geco pseudo-gt`: --teacher / --reconstructor, else :func:`default_inputs`
    driver: the render manifest's current samples (both splits); per object the pseudo-GT hash
        = hash(render sample's content hash, teacher hash, reconstructor hash, settings hash);
        todo = objects whose committed pseudo-GT has another hash, minus known failures
    Ray Data: read_shards -> filter_keys(todo) -> map_batches(PseudoGTActor, batch_size =
        pseudo_gt.batch_size, ActorPoolStrategy(num_actors), num_gpus = gpus_per_actor)
        each actor loads the teacher and the reconstructor once (geco.pseudo_gt.PseudoGT)
    driver: stream results -> geco.data.shards.DatasetRun (the writer render uses: atomic immutable
        shards, split by object id, manifest version, failures table) at pseudo_gt.output_uri
    MLflow: a `<name>/pseudo_gt` run - params, hashes, counts, seconds/object, a contact sheet
        (teacher grid | renders of the Gaussians) - only when there is something to do

Incremental: a re-run computes only what is missing or changed (a re-rendered object, another
teacher or reconstructor file, other settings); with nothing to do it opens no MLflow run and says
"nothing to do". Bad input is one line: a dataset without a manifest or without conditioning views
and a reconstructor whose input size does not fit the teacher's tiles are refused at the start
(:class:`~geco.pseudo_gt.PseudoGTSetupError`); a broken sample is skipped, named in a warning and
recorded in the failures table (skipped on re-runs with the same hash; ``retry_failed`` tries again);
a run in which every object failed raises :class:`PseudoGTFailed` after recording them.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import statistics
import tarfile
import time
from dataclasses import dataclass, field

import numpy as np

from geco import storage
from geco.config import GecoConfig
from geco.data import schema, shards
from geco.images import grid
from geco.models.teacher import TINY as TINY_TEACHER
from geco.pseudo_gt import PseudoGTError, PseudoGTSetupError, check_fit, weights_hash
from geco.tracking import lineage_tags, start_run
from pipelines.render import pack_members, unpack_members
from pipelines.stage import PseudoGTInputs, StageOutputs

STAGE = "pseudo_gt"
HASH_FIELD = "pseudo_gt_hash"
# teacher config fields that do not change its weights or the pseudo-GT (the stage's own settings decide steps,
# sampler and guidance; paths are replaced by the files' listing)
_TEACHER_NOT_HASHED = ("pretrained", "unet", "num_inference_steps", "sampler", "guidance_scale", "keep_text_encoder",
                       "cache_dir")
log = logging.getLogger(__name__)


class PseudoGTFailed(RuntimeError):
    """Every object of a run failed: the failures table says why (one line)."""


@dataclass
class PseudoGTOutputs(StageOutputs):
    """:class:`~pipelines.stage.StageOutputs` (``uris``: "pseudo_gt" = the shards) plus counts."""

    stage: str = STAGE
    dataset_uri: str = ""  # the render shards read
    teacher_uri: str = ""
    reconstructor_uri: str = ""
    computed: int = 0
    skipped: int = 0  # committed before with the same pseudo-GT hash
    failed: int = 0
    previously_failed: int = 0
    new_shards: list[str] = field(default_factory=list)
    manifest_uri: str | None = None
    failures_uri: str | None = None
    hashes: dict[str, str] = field(default_factory=dict)  # teacher, reconstructor, settings
    object_seconds: list[float] = field(default_factory=list)

    @property
    def pseudo_gt_uri(self) -> str | None:
        return self.uris.get(STAGE)

    @property
    def seconds_per_object(self) -> float:
        n = self.computed + self.failed
        return self.seconds / n if n else 0.0

    def note(self) -> str:
        return (f"{'nothing to do; ' if not self.did_work else ''}{self.computed} computed, {self.skipped} skipped "
                f"(done before), {self.failed} failed; {len(self.new_shards)} new shard(s) -> {self.pseudo_gt_uri}")

    def summary(self) -> str:
        lines = [f"pseudo_gt: {self.note()}",
                 f"  {self.previously_failed} skipped (failed before); {self.seconds:.1f} s wall, "
                 f"{self.seconds_per_object:.2f} s/object"
                 + (f" (median {statistics.median(self.object_seconds):.2f} s in an actor)" if self.object_seconds
                    else ""),
                 f"  from {self.dataset_uri}; teacher {self.teacher_uri or 'tiny random'}; reconstructor "
                 f"{self.reconstructor_uri or 'tiny random'}"]
        if self.manifest_uri:
            lines.append(f"  manifest: {self.manifest_uri}")
        if self.failures_uri:
            lines.append(f"  failures: {self.failures_uri}")
        if self.mlflow_run_id:
            lines.append(f"  mlflow run: {self.mlflow_run_id}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# inputs and hashes
# ---------------------------------------------------------------------------------------------
def default_inputs(cfg: GecoConfig, *, dataset_uri: str | None = None, teacher: str | None = None,
                   reconstructor: str | None = None) -> PseudoGTInputs:
    """The teacher and reconstructor stage 1 would use (:func:`pipelines.stage1.default_inputs`:
    given, else ``models.<m>.pretrained``, else pretrain's outputs, else tiny random)."""
    from pipelines.stage1 import default_inputs as stage1_inputs  # lazy: imports the training glue

    s1 = stage1_inputs(cfg, dataset_uri=dataset_uri, teacher=teacher, reconstructor=reconstructor)
    return PseudoGTInputs(s1.dataset_uri, s1.teacher_uri, s1.reconstructor_uri)


def model_hashes(cfg: GecoConfig, inputs: PseudoGTInputs) -> dict[str, str]:
    """``{"teacher", "reconstructor", "settings"}``: what, beside a sample's source, decides it."""
    t, r = cfg.models.teacher, cfg.models.reconstructor
    files = "" if inputs.teacher_uri == TINY_TEACHER else inputs.teacher_uri  # the tiny random one has none
    teacher = weights_hash([files, t.unet],
                           {k: v for k, v in t.model_dump(mode="json").items() if k not in _TEACHER_NOT_HASHED})
    recon = weights_hash([inputs.reconstructor_uri],
                         {k: v for k, v in r.model_dump(mode="json").items() if k != "pretrained"})
    return {"teacher": teacher, "reconstructor": recon, "settings": cfg.pseudo_gt.settings_hash(t.guidance_scale)}


def pseudo_gt_hash(source_hash: str, hashes: dict[str, str]) -> str:
    parts = [source_hash, hashes["teacher"], hashes["reconstructor"], hashes["settings"]]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:24]


def _first_sample_members(dataset_uri: str, shard: str) -> tuple[str, set[str]]:
    """(key, member names) of the first sample of a shard, reading only its first members."""
    names: set[str] = set()
    first = None
    with storage.open_read(storage.join(dataset_uri, shard)) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            key, _, member = m.name.partition(".")
            if first is None:
                first = key
            if key != first:
                break
            names.add(member)
    return first or "", names


def check_dataset(dataset_uri: str) -> dict:
    """The latest render manifest of ``dataset_uri``, checked: it exists, lists samples, and its
    samples carry a conditioning view (the first sample of the first shard is looked at)."""
    manifest = shards.read_latest_manifest(dataset_uri)
    if manifest is None:
        raise PseudoGTSetupError(f"{dataset_uri}: no shard manifest; run `geco render` first (or give --data)")
    live = shards.current_samples(manifest)
    if not live:
        raise PseudoGTSetupError(f"{dataset_uri}: the latest manifest lists no samples; run `geco render` first")
    shard = sorted(live)[0]
    key, names = _first_sample_members(dataset_uri, shard)
    if "cond.png" not in names:
        raise PseudoGTSetupError(
            f"{storage.join(dataset_uri, shard)}: sample {key!r} has no conditioning view (cond.png; it has "
            f"{', '.join(sorted(names)[:6]) or 'nothing'}): pseudo-GT reads render shards (`geco render`), not "
            "this dataset")
    return manifest


def _sources(manifest: dict) -> dict[str, tuple[str, str, str]]:
    """key -> (object id, content hash, shard) of each current sample in the manifest."""
    out = {}
    live = shards.current_samples(manifest)
    for shard in manifest["shards"]:
        for s in shard["samples"]:
            if s["key"] in live.get(shard["name"], ()):
                out[s["key"]] = (s.get("object_id", s["key"]), s["content_hash"], shard["name"])
    return out


# ---------------------------------------------------------------------------------------------
# the Ray actor: the teacher and the reconstructor, loaded once
# ---------------------------------------------------------------------------------------------
class PseudoGTActor:
    """Ray Data callable class: a batch of render rows -> one result row per object."""

    def __init__(self, cfg_json: str, teacher_uri: str, reconstructor_uri: str):
        import torch

        from geco.models.reconstructors import load_reconstructor
        from geco.models.teacher import make_teacher
        from geco.pseudo_gt import PseudoGT

        cfg = GecoConfig.model_validate_json(cfg_json)
        p = cfg.pseudo_gt
        if p.torch_threads:
            torch.set_num_threads(p.torch_threads)
        device = "cuda" if p.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        teacher = make_teacher(cfg.models.teacher.model_copy(update={"pretrained": teacher_uri}))
        teacher.requires_grad_(False).eval().to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a tiny random reconstructor (no weights: tests only) is the same in every actor
            rec = load_reconstructor(cfg.models.reconstructor.model_copy(update={"pretrained": reconstructor_uri}),
                                     device)
        rec.requires_grad_(False).eval()
        self.pgt = PseudoGT(teacher, rec, p)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["__key__"])
        rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
        t0 = time.perf_counter()
        results = self.pgt.run(rows)
        out = {"key": [], "url": [], "ok": [], "reason": [], "seconds": [], "sample": []}
        for row, res in zip(rows, results):
            ok = not isinstance(res, PseudoGTError)
            out["key"].append(str(row["__key__"]))
            out["url"].append(str(row.get("__url__") or ""))
            out["ok"].append(ok)
            out["reason"].append("" if ok else str(res))
            out["seconds"].append(sum(res.seconds.values()) if ok else 0.0)
            out["sample"].append(pack_members(res.members) if ok else b"")
        log.debug("pseudo_gt actor: %d object(s) in %.1f s", n, time.perf_counter() - t0)
        return out


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def _on_white(png: bytes) -> np.ndarray:
    from PIL import Image

    im = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA")).astype(np.float32) / 255
    return (255 * (im[..., :3] * im[..., 3:] + (1 - im[..., 3:]))).round().astype(np.uint8)


def contact_sheet(samples: list[dict[str, bytes]], views: int = 9) -> np.ndarray:
    """One row per object: the teacher's grid, then the first ``views`` renders on white."""
    from PIL import Image

    rows = []
    for m in samples:
        teacher = np.asarray(Image.open(io.BytesIO(m["teacher.png"])).convert("RGB"))
        names = sorted(k for k in m if k.endswith(".png") and k[:3].isdigit())[:views]
        rows.append([teacher] + [_on_white(m[k]) for k in names])
    return grid(rows)


def run(cfg: GecoConfig, inputs: PseudoGTInputs | None = None, *, parent_run_id: str | None = None,
        retry_failed: bool = False) -> PseudoGTOutputs:
    """Make pseudo-GT for every current sample of ``inputs.dataset_uri`` that lacks it (module
    docstring); returns what was done and where."""
    import ray

    from pipelines.cluster import init_ray
    from pipelines.data import filter_keys, read_shards

    t_start = time.perf_counter()
    p = cfg.pseudo_gt
    inputs = inputs or default_inputs(cfg)
    out_uri = storage.absolute_uri(p.output_uri.rstrip("/"))
    src_uri = storage.absolute_uri(inputs.dataset_uri.rstrip("/"))
    if out_uri == src_uri:
        raise PseudoGTSetupError(f"pseudo_gt.output_uri={p.output_uri} is the render dataset itself; give another")
    # refused before any work: a mismatched pair, no dataset, no conditioning views, an unwritable output
    check_fit(cfg.models.teacher.tile_size, cfg.models.reconstructor.input_size, p.max_reconstructor_upscale)
    manifest = check_dataset(src_uri)
    storage.check_writable(out_uri)

    hashes = model_hashes(cfg, inputs)
    sources = _sources(manifest)
    pgt_hashes = {k: pseudo_gt_hash(h, hashes) for k, (_, h, _) in sources.items()}
    ds_run = shards.DatasetRun(out_uri, cfg.dataset.samples_per_shard, cfg.dataset.val_fraction,
                               cfg.dataset.stale_temp_hours * 3600)
    if ds_run.stale_removed:
        log.warning("pseudo_gt: removed %d temporary file(s) left by killed writers", len(ds_run.stale_removed))
    # failure rows name the object by its render key (the sample's __key__)
    todo, skipped, previously_failed = shards.plan(sorted(sources), pgt_hashes, ds_run.done, ds_run.prev_failures,
                                                   hash_field=HASH_FIELD, retry_failed=retry_failed)
    settings_hash = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]
    list_hash = hashlib.sha256(json.dumps(sorted((k, h) for k, (_, h, _) in sources.items())).encode()).hexdigest()[:16]
    result = PseudoGTOutputs(uris={STAGE: out_uri}, did_work=False, dataset_uri=src_uri, teacher_uri=inputs.teacher_uri,
                             reconstructor_uri=inputs.reconstructor_uri, skipped=skipped,
                             previously_failed=previously_failed, hashes=hashes)
    if not todo and not ds_run.changed(settings_hash, list_hash):
        result.seconds = time.perf_counter() - t_start
        return result  # nothing to do: no MLflow run, no new version

    result.did_work = True
    sheet: list[dict[str, bytes]] = []
    lineage = lineage_tags(cfg, dataset_uri=src_uri, inputs={"teacher": inputs.teacher_uri or "tiny random",
                                                            "reconstructor": inputs.reconstructor_uri or "tiny random"})
    with start_run(cfg.tracking, run_name=f"{cfg.name}/{STAGE}", parent_run_id=parent_run_id,
                   tags={"geco.stage": STAGE, **lineage}) as tracker:
        result.mlflow_run_ids = {STAGE: tracker.run_id} if tracker.run_id else {}
        tracker.log_params({"pseudo_gt": p.model_dump(mode="json"), "dataset_uri": src_uri,
                            "teacher_uri": inputs.teacher_uri or "tiny random",
                            "reconstructor_uri": inputs.reconstructor_uri or "tiny random",
                            **{f"hash.{k}": v for k, v in hashes.items()}})
        tracker.set_tags({"geco.dataset_uri": src_uri, "geco.pseudo_gt_uri": out_uri,
                          "geco.teacher_uri": inputs.teacher_uri or "tiny random",
                          "geco.reconstructor_uri": inputs.reconstructor_uri or "tiny random"})
        try:
            if todo:
                init_ray(cfg.ray.address)
                ds = filter_keys(read_shards(src_uri, None, manifest=manifest), todo)
                ds = ds.map_batches(
                    PseudoGTActor, batch_size=p.batch_size,
                    fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "teacher_uri": inputs.teacher_uri,
                                           "reconstructor_uri": inputs.reconstructor_uri},
                    compute=ray.data.ActorPoolStrategy(size=p.num_actors), num_cpus=p.cpus_per_actor,
                    num_gpus=p.gpus_per_actor or None)
                seen: set[str] = set()
                for row in ds.iter_rows():
                    key = row["key"]
                    if key in seen:  # a retried task may deliver an object twice: keep the first
                        continue
                    seen.add(key)
                    oid, source_hash, shard = sources[key]
                    if row["ok"]:
                        members = unpack_members(row["sample"])
                        members["meta.json"] = json.dumps({
                            "source_hash": source_hash, "teacher_hash": hashes["teacher"],
                            "reconstructor_hash": hashes["reconstructor"], "settings_hash": hashes["settings"],
                            "pseudo_gt_hash": pgt_hashes[key], "object_id": oid, "source_dataset": src_uri,
                            "source_shard": shard, "teacher_uri": inputs.teacher_uri,
                            "reconstructor_uri": inputs.reconstructor_uri, "steps": p.steps,
                            "guidance_scale": cfg.models.teacher.guidance_scale if p.guidance_scale is None
                            else p.guidance_scale, "seed": p.seed}, sort_keys=True).encode()
                        # no cond depth and no normals in pseudo-GT (CONTRACTS.md); views carry depth
                        sample = schema.sample_from_members(key, members, require_depth=False, require_normals=False)
                        ds_run.add(sample, pgt_hashes[key], oid)
                        result.computed += 1
                        result.object_seconds.append(row["seconds"])
                        if len(sheet) < cfg.tracking.contact_sheet_objects:
                            sheet.append(members)
                    else:
                        log.warning("pseudo_gt: skipped %s (shard %s): %s", key, shard, row["reason"])
                        result.failed += 1
                        ds_run.fail({"object_id": key, "uri": storage.join(src_uri, shard), "reason": row["reason"],
                                     HASH_FIELD: pgt_hashes[key], "retryable": False})
            result.manifest_uri, result.failures_uri = ds_run.commit(
                settings_hash=settings_hash, source_list_hash=list_hash, config=cfg.model_dump(mode="json"),
                extra={"stage": STAGE, "source_dataset": src_uri, "source_manifest_version": manifest["version"],
                       "hashes": hashes})
        except BaseException as e:
            ds_run.abort(e)  # committed shards stay; the next run resumes from them
            raise
        result.new_shards = ds_run.new_shards
        result.seconds = time.perf_counter() - t_start
        tracker.log_metrics({"computed": result.computed, "skipped": result.skipped, "failed": result.failed,
                             "previously_failed": result.previously_failed, "new_shards": len(result.new_shards),
                             "seconds": result.seconds, "seconds_per_object": result.seconds_per_object,
                             "objects_per_min": 60 * (result.computed + result.failed) / max(result.seconds, 1e-9)})
        if ds_run.failures:
            tracker.log_table(ds_run.failures, "failures.json")
        if sheet:
            tracker.log_image(contact_sheet(sheet), "contact_sheet.png")
        if result.manifest_uri:
            tracker.set_tags({"geco.manifest": result.manifest_uri})
    if todo and result.computed == 0 and result.failed:
        reasons = "; ".join(sorted({f["reason"].splitlines()[0][:120] for f in ds_run.failures})[:3])
        raise PseudoGTFailed(f"pseudo_gt: all {result.failed} object(s) failed ({reasons}); see the failures table "
                             f"in {out_uri}")
    return result

