"""Training-read throughput: WebDataset shards vs one file per view in folders, local and over S3.

``python -m benchmarks.read [--quick] [--objects 64] [--views 15] [--resolution 256] [--repeats 3]
[--samples-per-shard 16] [--no-s3]`` -> ``benchmarks/results/read.json``.

* **Case (A)**: the shards :class:`geco.data.shards.ShardWriter` commits, read and decoded by
  :func:`geco.data.loader.iter_samples` (one streamed GET per shard over S3).
* **Baseline (B)**: the same renders as the LGM / InstantMesh layout, one file per member:
  ``<object>/cond.png``, ``<object>/000.png``, ``<object>/000.depth.npy``,
  ``<object>/000.normal.png``, ..., ``<object>/cameras.json``, ``<object>/meta.json``. A reader
  GETs ``cameras.json`` first, then every member it names (:func:`geco.storage.read_bytes`: one
  GET per file over S3, no LIST - the baseline's real cost, and nothing more).
* Both arms decode with the same :func:`geco.data.schema.decode_sample` (all views, depth and
  normals, white background), one reader thread each, so only the storage layout differs.
  ``samples/s`` = objects (one sample = one object with all its views) per second of wall time.
* Storage: a local folder, and a real S3 server (SeaweedFS ``weed mini`` on 127.0.0.1 via
  ``tests.services.SeaweedS3``; its data on the local disk) - no network latency, so S3 numbers
  here are a lower bound on the per-request cost of a real object store.
* Samples are synthetic but render-like (numpy): per view a 256² RGBA PNG of a shaded, textured
  blob with Monte-Carlo-like noise (about the size of a real 16-spp Cycles render), a float16
  z-depth ``.npy`` and a smooth normal-map PNG; ``cameras.json`` from
  :func:`geco.cameras.sample_object_cameras` (15 views = cond + 6 Zero123++ + 8 random, the
  pipeline's default count, all at ``--resolution``). Objects draw their views from a pool of
  ``--view-pool`` distinct views (PNG encoding is slow on 2 cores); bytes are stored and read
  per object regardless, so this changes nothing for either reader.
* A/B interleaved finely (the machine is shared and its load swings within seconds): a repeat is
  one pass over all objects in which shard k and the folders of the same objects are read back
  to back, the order alternating (AB, BA, ...). Value and baseline: samples/s from the median
  pass time; ratio: median over ``--repeats`` passes of (folders seconds) / (shards seconds).
  I/O-only rows (no decode) isolate the layout's own cost.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import arg_parser, median, report, result, row

NAME = "read"
TARGET_S3 = 3.0
BUCKET = "geco-bench"


# ------------------------------------------------------------------------------- synthetic data
def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=4)  # as scene.py writes renders
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _view(rng: np.random.Generator, res: int) -> dict[str, bytes]:
    """One render-like view: RGBA, depth and normals of a textured ellipsoid-ish blob."""
    yy, xx = (np.mgrid[0:res, 0:res] + 0.5) / res * 2.0 - 1.0
    cx, cy = rng.uniform(-0.15, 0.15, 2)
    rx, ry = rng.uniform(0.6, 0.85, 2)
    u, v = (xx - cx) / rx, (yy - cy) / ry
    r2 = u * u + v * v
    # anti-aliased silhouette with a wobbly outline
    wobble = 1.0 + 0.08 * np.sin(np.arctan2(v, u) * rng.integers(3, 7) + rng.uniform(0, 6.3))
    edge = (wobble - np.sqrt(r2)) * res * min(rx, ry) / 2
    alpha = np.clip(edge + 0.5, 0.0, 1.0)
    inside = alpha > 0
    nz = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    normal = np.stack([u, -v, nz], -1) * inside[..., None]
    norm = np.linalg.norm(normal, axis=-1, keepdims=True)
    normal = np.where(norm > 0, normal / np.maximum(norm, 1e-6), 0.0)
    normal_noisy = normal + rng.normal(0.0, 0.004, normal.shape)  # 16-spp normals are noisy too
    # texture (checker or stripes of two random colours) x Lambert shading + 16-spp-like noise
    freq = rng.uniform(4, 12)
    pattern = ((np.floor(u * freq) + np.floor(v * freq)) % 2 if rng.random() < 0.5
               else (np.floor((u + v) * freq) % 2))
    c0, c1 = rng.uniform(0.1, 0.9, (2, 3))
    albedo = np.where(pattern[..., None] > 0, c0, c1)
    light = np.array([0.4, 0.5, 0.77])
    shade = 0.35 + 0.65 * np.clip(normal @ light, 0.0, 1.0)
    rgb = albedo * shade[..., None] + rng.normal(0.0, 0.06, (res, res, 3))
    rgba = np.concatenate([np.clip(rgb, 0, 1) * 255.0, alpha[..., None] * 255.0], -1)
    rgba = np.where(inside[..., None], rgba, 0.0).round().astype(np.uint8)
    radius = rng.uniform(1.4, 2.1)
    depth = np.where(inside, radius - 0.5 * nz, 0.0).astype(np.float16)
    normal_png = np.where(inside[..., None], (normal_noisy + 1.0) * 127.5, 128.0).round().clip(0, 255).astype(np.uint8)
    return {"png": _png(rgba), "depth.npy": _npy(depth), "normal.png": _png(normal_png)}


def make_view_pool(size: int, res: int, seed: int = 0) -> list[dict[str, bytes]]:
    """``size`` distinct render-like views (PNG encoding is the slow part of making samples)."""
    rng = np.random.default_rng([seed, 12345])
    return [_view(rng, res) for _ in range(size)]


def make_sample(index: int, views: int, res: int, pool: list[dict[str, bytes]], seed: int = 0
                ) -> tuple[str, dict[str, bytes]]:
    """(object id, members) of one synthetic rendered object with ``views`` cameras (cond first);
    its views are drawn from ``pool`` (distinct within the object)."""
    from geco.cameras import sample_object_cameras

    if views < 7:
        raise SystemExit("--views must be >= 7 (cond + the 6 Zero123++ views + random ones)")
    object_id = f"bench-{index:05d}"
    rng = np.random.default_rng([seed, index])
    cams = sample_object_cameras(object_id, seed, cond_resolution=res, z123_resolution=res,
                                 random_resolution=res, num_random=views - 7)
    names = ["cond"] + [f"{i:03d}" for i in range(views - 1)]
    picks = rng.choice(len(pool), size=views, replace=len(pool) < views)
    members: dict[str, bytes] = {}
    for name, k in zip(names, picks):
        for suffix, data in pool[int(k)].items():
            members[f"{name}.{suffix}"] = data
    members["cameras.json"] = json.dumps([{**c.to_dict(), "name": n} for c, n in zip(cams, names)]).encode()
    members["meta.json"] = json.dumps({"source": "synthetic", "object_id": object_id, "views": views}).encode()
    return object_id, members


# ------------------------------------------------------------------------------- writing
def write_shards(samples, uri: str, samples_per_shard: int) -> list[tuple[str, list[str]]]:
    """Commit the samples as shards; ``[(shard uri, [keys in it]), ...]``."""
    from geco.data.schema import sample_from_members
    from geco.data.shards import ShardWriter, shard_uri

    with ShardWriter(uri, samples_per_shard) as w:
        for object_id, members in samples:
            w.add(sample_from_members(object_id, members), content_hash=object_id, split="train")
    return [(shard_uri(uri, s["index"]), [e["key"] for e in s["samples"]]) for s in w.committed]


def write_folders(samples, uri: str) -> dict[str, str]:
    """Write every member as its own file / object; ``{key: object folder}``."""
    from geco import storage

    jobs = [(storage.join(uri, oid, name), data) for oid, members in samples for name, data in members.items()]
    if storage.is_s3(uri):
        client = storage.s3_client()

        def put(job):
            bucket, key = storage.split_s3(job[0])
            client.put_object(Bucket=bucket, Key=key, Body=job[1])
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, jobs))
    else:
        for path, data in jobs:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(data)
    return {oid: storage.join(uri, oid) for oid, _ in samples}


# ------------------------------------------------------------------------------- reading
def read_shards(shard_uris: list[str], decode: bool) -> int:
    from geco.data.loader import iter_samples

    n = 0
    for _ in iter_samples(shard_uris, decode=decode):
        n += 1
    return n


def read_folders(object_dirs: list[str], decode: bool) -> int:
    """The LGM/InstantMesh reader: GET cameras.json, then each member it names, then decode."""
    from geco import storage
    from geco.data.schema import decode_sample

    n = 0
    for d in object_dirs:
        cams = storage.read_bytes(storage.join(d, "cameras.json"))
        names = [c["name"] for c in json.loads(cams)]
        sample = {"__key__": storage.basename(d), "cameras.json": cams,
                  "meta.json": storage.read_bytes(storage.join(d, "meta.json"))}
        for name in names:
            for suffix in ("png", "depth.npy", "normal.png"):
                member = f"{name}.{suffix}"
                sample[member] = storage.read_bytes(storage.join(d, member))
        if decode:
            decode_sample(sample)
        n += 1
    return n


def _measure(storage_name: str, shards, folders: dict[str, str], repeats: int, decode: bool) -> dict:
    """``repeats`` passes over all objects; within a pass, shard k and the folders of the same
    objects are read back to back (order alternating), so load swings hit both arms alike."""
    what = "decoded" if decode else "io-only"
    chunks = [([uri], [folders[k] for k in keys], len(keys)) for uri, keys in shards]
    n = sum(c[2] for c in chunks)
    read_shards(chunks[0][0], decode)  # warm-up, untimed: imports, S3 client, PIL plugins
    read_folders(chunks[0][1][:1], decode)
    shards_s, folders_s = [], []
    step = 0
    for rep in range(repeats):
        a_s = b_s = 0.0
        for shard_uris, dirs, count in chunks:
            first, second = ("shards", "folders") if step % 2 == 0 else ("folders", "shards")
            step += 1
            for arm in (first, second):
                t0 = time.perf_counter()
                got = read_shards(shard_uris, decode) if arm == "shards" else read_folders(dirs, decode)
                seconds = time.perf_counter() - t0
                if got != count:
                    raise RuntimeError(f"{storage_name} {arm}: read {got} samples, expected {count}")
                if arm == "shards":
                    a_s += seconds
                else:
                    b_s += seconds
        shards_s.append(a_s)
        folders_s.append(b_s)
        print(f"  {storage_name:5s} {what:7s} rep {rep}  shards {a_s:7.2f}s ({n / a_s:7.1f}/s)  "
              f"folders {b_s:7.2f}s ({n / b_s:7.1f}/s)  ratio {b_s / a_s:5.2f}", flush=True)
    return {"shards_s": shards_s, "folders_s": folders_s, "ratios": [b / a for a, b in zip(shards_s, folders_s)]}


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = arg_parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--objects", type=int, default=64)
    p.add_argument("--views", type=int, default=15, help="cameras per object incl. cond (>= 7)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="A/B repeats per storage (alternating order)")
    p.add_argument("--samples-per-shard", type=int, default=16)
    p.add_argument("--view-pool", type=int, default=120, help="distinct synthetic views objects draw from")
    p.add_argument("--no-s3", action="store_true", help="local storage only (no SeaweedFS server)")
    p.add_argument("--no-io-only", action="store_true", help="skip the I/O-only (no decode) rows")
    args = p.parse_args(argv)
    if args.quick:
        args.objects, args.views, args.resolution, args.repeats, args.samples_per_shard = 4, 7, 32, 1, 2

    import torch

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reader = one DataLoader worker (PyTorch sets 1 thread in workers)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="geco-bench-read-"))
    t0 = time.perf_counter()
    pool = make_view_pool(min(args.objects * args.views, args.view_pool), args.resolution)
    samples = [make_sample(i, args.views, args.resolution, pool) for i in range(args.objects)]
    gen_s = time.perf_counter() - t0
    sample_bytes = [sum(len(v) for v in m.values()) for _, m in samples]
    first = samples[0][1]
    member_bytes = {suffix: int(np.mean([len(v) for k, v in first.items() if k.endswith("." + suffix)
                                         and not (suffix == "png" and k.endswith(".normal.png"))]))
                    for suffix in ("png", "depth.npy", "normal.png")}
    print(f"  {args.objects} synthetic objects x {args.views} views at {args.resolution}²: "
          f"{np.mean(sample_bytes) / 1e6:.2f} MB/object, {len(first)} files/object ({gen_s:.1f}s to make)", flush=True)

    storages: dict[str, str] = {"local": str(work / "local")}
    server = None
    saved_env = {}
    rows, measured, layout = [], {}, {}
    try:
        if not args.no_s3:
            from geco import storage
            from tests.services import SeaweedS3

            server = SeaweedS3(work / "seaweed").start()
            for k, v in server.env().items():
                saved_env[k] = os.environ.get(k)
                os.environ[k] = v
            storage._client.cache_clear()
            storages["s3"] = server.create_bucket(BUCKET)
        for sname, root in storages.items():
            t0 = time.perf_counter()
            shards = write_shards(samples, f"{root}/shards", args.samples_per_shard)
            folders = write_folders(samples, f"{root}/folders")
            layout[sname] = {"shards": len(shards), "objects": len(folders), "write_s": round(time.perf_counter() - t0, 1)}
            for decode in ([True] if args.no_io_only else [True, False]):
                measured[(sname, decode)] = _measure(sname, shards, folders, args.repeats, decode)
    finally:
        if server is not None:
            server.stop()
            from geco import storage

            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            storage._client.cache_clear()
        shutil.rmtree(work, ignore_errors=True)
        torch.set_num_threads(torch_threads)

    n = args.objects
    for (sname, decode), m in measured.items():
        where = "over S3 (SeaweedFS, 127.0.0.1)" if sname == "s3" else "local disk"
        what = "decoded samples/s" if decode else "I/O only (no decode) samples/s"
        target = TARGET_S3 if (sname == "s3" and decode) else None
        rows.append(row(f"shards vs one file per view, {where}: {what}", n / median(m["shards_s"]), "samples/s",
                        baseline=n / median(m["folders_s"]), ratio=median(m["ratios"]), target=target))
    rows.sort(key=lambda r: (r["target"] is None, "I/O only" in r["case"], "local" in r["case"]))
    files_per_object = len(first)
    details = {
        "what": "samples/s = objects read (and decoded) per second of wall time, one reader thread, "
                "torch.set_num_threads(1) as in a DataLoader worker; "
                "value/baseline from the median time over repeats, ratio = median over repeats of "
                "(shards samples/s) / (folders samples/s) measured back to back.",
        "objects": n,
        "views_per_object": args.views,
        "views": f"cond + 6 Zero123++ + {args.views - 7} random, all {args.resolution}x{args.resolution}; "
                 "per view: RGBA PNG, float16 depth .npy, normal PNG",
        "mean_bytes_per_object": int(np.mean(sample_bytes)),
        "mean_bytes_per_member": member_bytes,
        "files_per_object_folders": files_per_object,
        "s3_gets_per_object_folders": files_per_object,
        "s3_gets_per_object_shards": round(max(layout.get("s3", layout["local"])["shards"], 1) / n, 4),
        "samples_per_shard": args.samples_per_shard,
        "layout": layout,
        "per_repeat_seconds": {f"{s}/{'decoded' if d else 'io-only'}": {k: [round(x, 3) for x in v] for k, v in m.items()}
                               for (s, d), m in measured.items()},
        "order": "within each repeat, shard k then the folders of its objects, or the reverse, alternating",
        "distinct_views_in_pool": len(pool),
        "generate_s": round(gen_s, 1),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "quick": bool(args.quick),
    }
    res = result(NAME, rows, details)
    report(res, args.out, quick=args.quick)
    return res


if __name__ == "__main__":
    main()
