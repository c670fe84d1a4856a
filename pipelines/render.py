"""DAG stage `render`: objects in → WebDataset shards + manifest + failures table out.

    refs = list objects (source)                                    [driver]
    todo = refs not yet in committed shards (content hash + settings), minus known failures
    Ray Data: from_items(todo) → map_batches(RenderActor)           [long-lived Blender actors]
    driver: stream results → ShardWriter (atomic, immutable shards) → manifest version + failures
    MLflow: params, counts, throughput, failures table, contact sheet

Each `RenderActor` owns one long-lived Blender child process (`geco.render.blender.worker`):
start-up (1–2.5 s) is paid once per actor, a hung object is killed at `render.blender.timeout_s`
and the child restarted, and Blender's exit-time segfault never decides success. Ray restarts an
actor that dies (`max_restarts=-1`) and retries its object (`max_task_retries=-1`).

Resumable: the committed shard index files are the source of truth, so a job killed midway
resumes with what it committed (and removes the temporaries it left: see
:func:`geco.data.shards.clean_stale_temporaries`); a re-run with the same config renders
nothing, writes no new manifest or failures version and opens no MLflow run ("nothing to do").
The shard / manifest / failures bookkeeping is :class:`geco.data.shards.DatasetRun`, shared with
the pseudo-GT stage.

Failures: an object the renderer cannot render (or the source rejects) is a property of the
object: recorded once and skipped on re-runs (``--retry-failed`` tries again). A failure to
*fetch* it (file not found, S3 unreachable, no network) is the environment's: recorded as
``retryable`` and tried again on the next run. A run in which no object of the source is
rendered (all failed, now or before, or rejected) raises :class:`RenderAborted`; a source with
nothing in it raises :class:`geco.sources.SourceError`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import statistics
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geco import faults, storage
from geco.config import GecoConfig, RenderConfig
from geco.data import schema, shards
from geco.data.cache import ObjectCache
from geco.sources import ObjectRef, SourceError, SourceListing, UnsafePath, list_objects, source_list_hash
from geco.tracking import image_grid, lineage_tags, start_run
from pipelines.cluster import init_ray

log = logging.getLogger(__name__)


class RenderAborted(RuntimeError):
    """Too many objects failed: a broken install or setup, not broken objects."""


@dataclass
class RenderOutputs:
    dataset_uri: str
    manifest_uri: str | None
    failures_uri: str | None
    new_shards: list[str] = field(default_factory=list)
    rendered: int = 0
    skipped: int = 0
    failed: int = 0
    previously_failed: int = 0
    rejected: int = 0
    excluded: int = 0
    source: str = ""
    stale_removed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    render_seconds: list[float] = field(default_factory=list)
    mlflow_run_id: str | None = None
    nothing_to_do: bool = False  # a re-run with nothing to render and nothing new: no MLflow run, no new version

    @property
    def seconds_per_object(self) -> float:
        n = self.rendered + self.failed
        return self.seconds / n if n else 0.0

    def summary(self) -> str:
        lines = [
            f"render: {'nothing to do; ' if self.nothing_to_do else ''}{self.rendered} rendered, {self.skipped} skipped (already done), "
            f"{self.failed} failed, {self.previously_failed} skipped (failed before; --retry-failed), "
            f"{self.rejected} rejected by the source, {self.excluded} excluded by licence",
            f"  {len(self.new_shards)} new shard(s) in {self.dataset_uri}; "
            f"{self.seconds:.1f} s wall, {self.seconds_per_object:.2f} s/object"
            + (f" (median {statistics.median(self.render_seconds):.2f} s in a renderer)" if self.render_seconds else ""),
        ]
        if self.source:
            lines.append(f"  {self.source}")
        if self.stale_removed:
            lines.append(f"  removed {len(self.stale_removed)} temporary file(s) of killed writers")
        if self.manifest_uri:
            lines.append(f"  manifest: {self.manifest_uri}")
        if self.failures_uri:
            lines.append(f"  failures: {self.failures_uri}")
        if self.mlflow_run_id:
            lines.append(f"  mlflow run: {self.mlflow_run_id}")
        return "\n".join(lines)


def sample_hash(content_hash: str, settings_hash: str) -> str:
    """The hash a shard sample is recorded under: an object's content hash with the settings hash
    of the render that made it (also how the evaluation's leakage check finds training objects)."""
    return hashlib.sha256(f"{content_hash}:{settings_hash}".encode()).hexdigest()[:24]


def render_hash(ref: ObjectRef, render: RenderConfig) -> str:
    """What decides whether an object must be (re-)rendered: its bytes and the render settings."""
    return sample_hash(ref.content_hash, render.settings_hash())


# ---------------------------------------------------------------------------------------------
# Packing a rendered object into one bytes value (one Arrow cell) between actor and driver
# ---------------------------------------------------------------------------------------------
def pack_members(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack_members(blob: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


# ---------------------------------------------------------------------------------------------
# The Ray actor: one long-lived Blender per actor
# ---------------------------------------------------------------------------------------------
class RenderActor:
    """Ray Data callable class: renders a batch of objects (one per row) with its own Blender."""

    def __init__(self, render_json: str, cache_dir: str, cache_max_gb: float):
        from geco.render.blender.worker import BlenderRenderer

        self.render = RenderConfig.model_validate_json(render_json)
        b = self.render.blender
        self.renderer = BlenderRenderer(max_objects_per_process=b.max_objects_per_process)
        self.cache = ObjectCache(cache_dir, cache_max_gb)

    def _maybe_die(self, object_id: str) -> None:
        """Test-only fault points (:mod:`geco.faults`): ``kill-actor`` closes Blender and exits once;
        ``sigkill-actor`` SIGKILLs this actor once, a moment into rendering the object (no clean-up)."""
        for oid, marker in faults.matching("kill-actor"):
            if oid == object_id and faults.once(marker, "kill-actor"):
                self.renderer.close()
                os._exit(1)
        for oid, marker in faults.matching("sigkill-actor"):
            if oid == object_id and faults.once(marker, "sigkill-actor"):
                def sigkill(marker: str = marker) -> None:
                    # once this object's Blender child holds it (geco.render.blender.server writes
                    # "holding" and waits for the line below): the kill lands mid-render
                    deadline = time.monotonic() + 120
                    while time.monotonic() < deadline and "holding " not in Path(marker).read_text():
                        time.sleep(0.05)
                    with open(marker, "a") as f:
                        f.write(f"blender {self.renderer.pid}\n")
                    os.kill(os.getpid(), signal.SIGKILL)

                threading.Thread(target=sigkill, daemon=True).start()

    def _render_one(self, ref: ObjectRef, cams: list[dict] | None = None) -> dict:
        """Render ``ref`` at ``cams`` (cameras.json records, cond first; default: the render config's
        cameras for the object, :func:`geco.render.views.cameras_for`)."""
        from geco.render.views import blender_settings, cameras_for

        out = {"object_id": ref.object_id, "uri": ref.uri, "ok": False, "reason": "", "log_tail": "",
               "seconds": 0.0, "sample": b"", "meta": "{}", "retryable": False}
        t0 = time.perf_counter()
        try:
            path = self.cache.fetch(ref)
        except UnsafePath as e:  # the object's own files are unsafe: a property of the object
            out.update(reason=str(e), seconds=time.perf_counter() - t0)
            return out
        except Exception as e:  # missing file, S3 or network down: the environment's, retried next run
            out.update(reason=f"fetch failed: {type(e).__name__}: {e}", seconds=time.perf_counter() - t0,
                       retryable=True)
            return out
        self._maybe_die(ref.object_id)
        cams = cams or [c.to_dict() for c in cameras_for(ref.object_id, self.render)]
        with tempfile.TemporaryDirectory(prefix="geco-render-") as tmp:
            res = self.renderer.render(ref.object_id, str(path), cams, blender_settings(self.render), tmp,
                                       timeout_s=self.render.blender.timeout_s)
            out.update(ok=res.ok, reason=res.reason, log_tail=res.log_tail, seconds=time.perf_counter() - t0)
            if res.ok:
                meta = {**res.meta, "source_uri": ref.uri, "content_hash": ref.content_hash,
                        "license": ref.license, "source_kind": ref.source_kind,
                        "source_warnings": ref.warnings(), **ref.extra}
                Path(tmp, "meta.json").write_text(json.dumps(meta, sort_keys=True, default=str))
                try:
                    members = schema.sample_from_dir(ref.object_id, tmp, require_depth=self.render.depth,
                                                     require_normals=self.render.normals)
                except Exception as e:  # renderer said ok but a member is missing: record it
                    out.update(ok=False, reason=f"incomplete render: {e}")
                    return out
                members.pop("__key__", None)
                out.update(sample=pack_members(members), meta=json.dumps(meta, default=str))
        return out

    def __call__(self, batch: dict) -> dict:
        cams = batch.get("cameras")  # optional: a JSON list of camera records per row (the evaluation's views)
        rows = [self._render_one(ObjectRef.from_json(j), json.loads(cams[i]) if cams is not None else None)
                for i, j in enumerate(batch["ref"])]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}

    def __del__(self):
        try:
            self.renderer.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def _contact_sheet(samples: list[tuple[str, dict[str, bytes]]]) -> np.ndarray:
    """One row per object: the conditioning view, then the 6 Zero123++ views, on white."""
    from PIL import Image

    def on_white(png: bytes) -> np.ndarray:
        im = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA")).astype(np.float32) / 255
        return (255 * (im[..., :3] * im[..., 3:] + (1 - im[..., 3:]))).round().astype(np.uint8)

    tiles = []
    for _, m in samples:
        tiles += [on_white(m["cond.png"])] + [on_white(m[f"{i:03d}.png"]) for i in range(6)]
    return image_grid(tiles, cols=7)


is_retryable = shards.is_retryable  # one home: geco.data.shards (render and pseudo-GT share it)


def plan(refs: list[ObjectRef], hashes: dict[str, str], done: dict[str, str], prev_failures: dict[str, dict], *,
         force: bool = False, retry_failed: bool = False) -> tuple[list[ObjectRef], int, int]:
    """``(todo, skipped, previously_failed)``: :func:`geco.data.shards.plan` over the refs, keyed by
    the render hash (an object is skipped when committed with the same render hash, and skipped as
    failed before when its last failure had the same render hash and was not retryable)."""
    by_id = {r.object_id: r for r in refs}
    todo, skipped, previously_failed = shards.plan(list(by_id), hashes, done, prev_failures, hash_field="render_hash",
                                                   force=force, retry_failed=retry_failed)
    return [by_id[i] for i in todo], skipped, previously_failed


def rejected_failures(rejected: list[ObjectRef], prev_failures: dict[str, dict]) -> list[dict]:
    """Failure rows for the source's rejected refs, except those already recorded as they are
    (a re-run over the same rejected files adds nothing)."""
    rows = []
    for r in rejected:
        prev = prev_failures.get(r.object_id)
        if prev and prev.get("uri") == r.uri and prev.get("reason") == r.reason:
            continue
        rows.append({"object_id": r.object_id, "uri": r.uri, "reason": r.reason, "log_tail": "", "seconds": 0.0,
                     "render_hash": "", "retryable": False})
    return rows


def _nothing_rendered(listing: SourceListing, result: RenderOutputs, failures: list[dict]) -> str:
    reasons = "; ".join(sorted({f["reason"].splitlines()[0][:120] for f in failures if f.get("reason")})[:3])
    return (f"none of the {len(listing.objects) + len(listing.rejected)} objects of {listing.uri or listing.kind} "
            f"rendered ({result.failed} failed now, {result.previously_failed} failed before, {result.rejected} "
            f"rejected by the source)" + (f"; reasons: {reasons}" if reasons else "")
            + f"; see the failures table in {result.dataset_uri} (--retry-failed tries again)")


def run(cfg: GecoConfig, *, force: bool = False, retry_failed: bool = False,
        parent_run_id: str | None = None) -> RenderOutputs:
    """Render ``cfg.source`` into shards at ``cfg.dataset.uri``; returns what it wrote."""
    import ray

    t_start = time.perf_counter()
    out_uri = cfg.dataset.uri
    # Fail fast, before any work: output writable, source readable and not empty.
    storage.check_writable(out_uri)
    if storage.is_s3(cfg.source.uri):
        storage.check_readable(cfg.source.uri)

    listing = list_objects(cfg.source)
    log.info("render: %s", listing.describe())
    refs, rejected, excluded = listing.objects, listing.rejected, listing.excluded
    if not (refs or rejected or excluded):
        raise SourceError(f"{listing.uri or listing.kind}: the source has no objects to render ({listing.describe()})")
    if rejected:
        log.warning("render: %d file(s) of the source cannot be rendered and are recorded as failures, e.g. %s: %s",
                    len(rejected), rejected[0].uri, rejected[0].reason)
    ds_run = shards.DatasetRun(out_uri, cfg.dataset.samples_per_shard, cfg.dataset.val_fraction,
                               cfg.dataset.stale_temp_hours * 3600)
    stale = ds_run.stale_removed
    if stale:
        log.warning("render: removed %d temporary file(s) left by killed writers: %s", len(stale), ", ".join(stale))
    prev_failures = ds_run.prev_failures

    hashes = {r.object_id: render_hash(r, cfg.render) for r in refs}
    todo, skipped, previously_failed = plan(refs, hashes, ds_run.done, prev_failures, force=force,
                                            retry_failed=retry_failed)
    for row in rejected_failures(rejected, prev_failures):
        ds_run.fail(row)
    failures = ds_run.failures

    result = RenderOutputs(dataset_uri=out_uri, manifest_uri=None, failures_uri=None, skipped=skipped,
                           previously_failed=previously_failed, rejected=len(rejected), excluded=len(excluded),
                           source=listing.describe(), stale_removed=stale)
    list_hash, settings_hash = source_list_hash(refs), cfg.render.settings_hash()
    if not todo and not ds_run.changed(settings_hash, list_hash):
        # nothing to render, no new failure, the manifest says it all: no MLflow run, no new version
        result.nothing_to_do = True
        result.seconds = time.perf_counter() - t_start
        if (refs or rejected) and result.skipped == 0:
            raise RenderAborted(_nothing_rendered(listing, result, list(prev_failures.values())))
        return result
    sheet: list[tuple[str, dict[str, bytes]]] = []
    abort: str | None = None

    with start_run(cfg.tracking, run_name=f"{cfg.name}/render", parent_run_id=parent_run_id,
                   tags={"geco.stage": "render", **lineage_tags(cfg, dataset_uri=out_uri)}) as tracker:
        tracker.log_params({"source": cfg.source.model_dump(mode="json"), "render": cfg.render.model_dump(mode="json"),
                            "dataset": cfg.dataset.model_dump(mode="json"), "ray": cfg.ray.model_dump(mode="json"),
                            "limits": cfg.limits.model_dump(mode="json"), "force": force,
                            "render.settings_hash": cfg.render.settings_hash()})
        result.mlflow_run_id = tracker.run_id
        if todo:
            init_ray(cfg.ray.address)
            fault = faults.forward()  # test-only fault points; empty unless a test turns them on
            ds = ray.data.from_items([{"ref": r.to_json()} for r in todo], override_num_blocks=len(todo))
            ds = ds.map_batches(
                RenderActor, batch_size=1,
                fn_constructor_kwargs={"render_json": cfg.render.model_dump_json(), "cache_dir": cfg.cache.dir,
                                       "cache_max_gb": cfg.cache.max_gb},
                compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_renderers),
                num_cpus=cfg.ray.cpus_per_renderer, num_gpus=cfg.ray.gpus_per_renderer or None,
                runtime_env={"env_vars": fault} if fault else None,
            )
            attempted = 0
            seen: set[str] = set()
            for row in ds.iter_rows():
                oid = row["object_id"]
                if oid in seen:  # a retried task may deliver an object twice: keep the first
                    continue
                seen.add(oid)
                attempted += 1
                if row["ok"]:
                    members = unpack_members(row["sample"])
                    ds_run.add(schema.sample_from_members(oid, members), hashes[oid], oid)
                    result.rendered += 1
                    result.render_seconds.append(row["seconds"])
                    if len(sheet) < cfg.tracking.contact_sheet_objects:
                        sheet.append((oid, members))
                else:
                    result.failed += 1
                    ds_run.fail({k: row[k] for k in ("object_id", "uri", "reason", "log_tail", "seconds",
                                                     "retryable")} | {"render_hash": hashes[oid]})
                rate = result.failed / attempted
                if attempted >= cfg.limits.min_attempts and rate > cfg.limits.max_failure_rate:
                    reasons = "; ".join(sorted({f["reason"][:120] for f in failures[-5:]}))
                    abort = (f"aborted: {result.failed} of {attempted} objects failed ({rate:.0%} > "
                             f"limits.max_failure_rate={cfg.limits.max_failure_rate:.0%}). This looks like a "
                             f"broken install or setup, not broken objects. Recent reasons: {reasons}")
                    break
        # commits the last partial shard; a manifest / failures version only when something changed
        result.manifest_uri, result.failures_uri = ds_run.commit(
            settings_hash=settings_hash, source_list_hash=list_hash, config=cfg.model_dump(mode="json"))
        result.new_shards = ds_run.new_shards
        result.seconds = time.perf_counter() - t_start

        tracker.log_metrics({"rendered": result.rendered, "skipped": result.skipped, "failed": result.failed,
                             "previously_failed": result.previously_failed, "rejected": result.rejected,
                             "excluded": result.excluded, "stale_temporaries_removed": len(stale),
                             "new_shards": len(result.new_shards), "seconds": result.seconds,
                             "seconds_per_object": result.seconds_per_object,
                             "objects_per_min": 60 * (result.rendered + result.failed) / max(result.seconds, 1e-9)})
        if failures:
            tracker.log_table(failures, "failures.json")
        if sheet:
            tracker.log_image(_contact_sheet(sheet), "contact_sheet.png")
        if result.manifest_uri:
            tracker.log_dict(json.loads(storage.read_text(result.manifest_uri)), "manifest.json")
        tracker.set_tags({"geco.dataset_uri": out_uri, "geco.manifest": result.manifest_uri or ""})

    if abort:
        raise RenderAborted(abort + f"\nCommitted shards and the failures table are kept in {out_uri}.")
    if (refs or rejected) and result.rendered + result.skipped == 0:
        raise RenderAborted(_nothing_rendered(listing, result, failures + list(prev_failures.values())))
    return result
