"""The shard sample schema: what one rendered object looks like inside a WebDataset shard.

A sample is a flat ``dict[str, bytes]`` (WebDataset's model): ``"__key__"`` is the object's key
(:func:`sanitize_object_id` of its id) and every other entry is a *member* whose name is the tar
member suffix after ``<key>.``:

===================  =====================================================================
``cond.png``         conditioning view, RGBA 8-bit (straight, not premultiplied alpha)
``NNN.png``          view NNN (``000``-``005``: the 6 Zero123++ views in grid order;
                     ``006``...: random supervision views), RGBA 8-bit
``NNN.depth.npy``    camera z-depth in world units, float16 [H,W], 0 where there is no surface
``NNN.normal.png``   world-space normals stored as (n+1)/2 in RGB 8-bit
``cameras.json``     list of camera dicts, ``cond`` first then each view in order; each holds
                     ``name`` and the :class:`geco.cameras.Camera` fields (``kind``, ``width``,
                     ``height``, ``fov_deg``, ``radius``, ``azimuth_deg``, ``elevation_deg``),
                     usually also ``K`` [3,3] and ``w2c`` [4,4] (world-to-camera, OpenCV)
``meta.json``        source URI, content hash, licence, renderer settings, bbox, warnings ...
===================  =====================================================================

(``cond.depth.npy`` and ``cond.normal.png`` follow the same rules.)

:func:`decode_sample` turns a sample into torch tensors in the project's conventions and
composites the background at load time. It accepts raw bytes (our own reader,
``webdataset`` without decoders, ``ray.data.read_webdataset(..., decoder=None)``) and also the
values Ray's default decoder produces (PNG -> uint8 array, ``.npy`` -> array, ``.json`` -> object),
but raw bytes are the recommended input for Ray: see :mod:`geco.data.loader`.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "MAX_KEY_LEN",
    "SampleError",
    "decode_sample",
    "member_names",
    "sample_from_dir",
    "sample_from_members",
    "sanitize_object_id",
    "validate_members",
    "view_names",
]

#: Longest key :func:`sanitize_object_id` returns; tar member names (``<key>.NNN.depth.npy``)
#: then stay under the 100-character ustar limit.
MAX_KEY_LEN = 64
_HASH_LEN = 12
_KEY_OK = re.compile(r"[A-Za-z0-9_-]+")
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_VIEW_NAME = re.compile(r"\d{3}")
# A member name: lower-case dotted words (webdataset lower-cases suffixes when it groups files).
_MEMBER_OK = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)+")

#: Per-view member suffixes.
IMAGE, DEPTH, NORMAL = "png", "depth.npy", "normal.png"
#: Groups of same-resolution views, by camera kind.
VIEW_GROUPS = ("zero123", "random")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"


class SampleError(ValueError):
    """A rendered object / shard sample that does not follow the schema (the message says how)."""


# --------------------------------------------------------------------------------------------
# keys and names
# --------------------------------------------------------------------------------------------
def sanitize_object_id(raw: str) -> str:
    """A key that is safe as a WebDataset ``__key__`` and as a file name.

    Only ``[A-Za-z0-9_-]`` (no dots: WebDataset splits key and extension at the first dot; no
    ``/`` or ``..``: no path traversal), at most :data:`MAX_KEY_LEN` characters, never starting
    with ``-``. An id that is already safe is returned unchanged (Objaverse UIDs, GSO names);
    any other id is transliterated, shortened if needed and gets ``-<12 hex of sha256(raw)>``
    appended, so two different raw ids never map to the same key (up to a 48-bit hash). The
    function is idempotent. Note: keys are case-sensitive (``A`` and ``a`` are different keys).
    """
    if not isinstance(raw, str):
        raise TypeError(f"object id must be a str, got {type(raw).__name__}")
    if raw == "":
        raise ValueError("object id is empty")
    if len(raw) <= MAX_KEY_LEN and _KEY_OK.fullmatch(raw) and not raw.startswith("-"):
        return raw
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LEN]
    ascii_ = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode("ascii")
    base = _KEY_BAD_CHARS.sub("_", ascii_)
    base = re.sub(r"_{2,}", "_", base).strip("_-")
    base = base[: MAX_KEY_LEN - _HASH_LEN - 1].rstrip("_-") or "obj"
    return f"{base}-{digest}"


def view_names(num_views: int) -> list[str]:
    """``["000", "001", ...]``: the member-name prefixes of ``num_views`` views (``cond`` apart)."""
    if not 0 <= num_views <= 1000:
        raise ValueError(f"num_views must be in [0, 1000], got {num_views}")
    return [f"{i:03d}" for i in range(num_views)]


def member_names(num_views: int, with_depth: bool = True, with_normals: bool = True) -> list[str]:
    """All member names of a complete sample with ``num_views`` views (sorted)."""
    suffixes = [IMAGE] + ([DEPTH] if with_depth else []) + ([NORMAL] if with_normals else [])
    names = ["cameras.json", "meta.json"]
    for view in ["cond", *view_names(num_views)]:
        names += [f"{view}.{s}" for s in suffixes]
    return sorted(names)


# --------------------------------------------------------------------------------------------
# building and validating samples
# --------------------------------------------------------------------------------------------
def _camera_names(cameras: list) -> list[str]:
    """Names of the cameras (``cond`` first), filling in missing ``name`` fields by position."""
    names = []
    for i, cam in enumerate(cameras):
        if not isinstance(cam, Mapping):
            raise SampleError(f"cameras.json entry {i} is not an object")
        default = "cond" if i == 0 else f"{i - 1:03d}"
        names.append(str(cam.get("name", default)))
    return names


def validate_members(object_id: str, members: Mapping[str, bytes], *, require_depth: bool = True,
                     require_normals: bool = True) -> list[dict]:
    """Check that ``members`` is a complete, consistent rendered object; return its cameras.

    Required: ``cameras.json`` (cond first, then views ``000``, ``001``, ... in order),
    ``meta.json``, and for ``cond`` and every view ``<name>.png`` (+ ``.depth.npy`` and
    ``.normal.png`` unless switched off). Checks PNG / NPY magic bytes and JSON syntax only
    (images are decoded by :func:`decode_sample`). Raises :class:`SampleError` naming the object
    and everything that is missing or wrong.
    """
    problems: list[str] = []
    for name in members:
        if not _MEMBER_OK.fullmatch(name):
            problems.append(f"member name {name!r} is not lower-case dotted words")
    cameras: list = []
    for name in ("cameras.json", "meta.json"):
        if name not in members:
            problems.append(f"missing {name}")
            continue
        try:
            value = json.loads(members[name])
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{name} is not valid JSON ({e})")
            continue
        if name == "cameras.json":
            if not isinstance(value, list) or not value:
                problems.append("cameras.json must be a non-empty list (cond first)")
            else:
                cameras = value
        elif not isinstance(value, dict):
            problems.append("meta.json must be a JSON object")
    if cameras:
        try:
            names = _camera_names(cameras)
        except SampleError as e:
            problems.append(str(e))
            names = []
        if names:
            if names[0] != "cond" or cameras[0].get("kind", "cond") != "cond":
                problems.append("cameras.json must start with the cond camera (name/kind 'cond')")
            expected = view_names(len(names) - 1)
            if names[1:] != expected:
                problems.append(f"cameras.json view names must be {expected[:3]}... in order, got {names[1:][:8]}")
            suffixes = [IMAGE] + ([DEPTH] if require_depth else []) + ([NORMAL] if require_normals else [])
            missing = [f"{v}.{s}" for v in names for s in suffixes if f"{v}.{s}" not in members]
            if missing:
                more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
                problems.append(f"missing {', '.join(missing[:10])}{more}")
            known = set(names)
            stray = sorted(m for m in members if m.split(".", 1)[0] not in known
                           and (m.split(".", 1)[0] == "cond" or _VIEW_NAME.fullmatch(m.split(".", 1)[0])))
            if stray:
                problems.append(f"members without a camera in cameras.json: {', '.join(stray[:10])}")
    for name, data in members.items():
        if not isinstance(data, (bytes, bytearray, memoryview)):
            problems.append(f"{name} is {type(data).__name__}, not bytes")
        elif name.endswith(".png") and bytes(data[:8]) != _PNG_MAGIC:
            problems.append(f"{name} is not a PNG file")
        elif name.endswith(".npy") and bytes(data[:6]) != _NPY_MAGIC:
            problems.append(f"{name} is not a .npy file")
    if problems:
        raise SampleError(f"object {object_id!r}: " + "; ".join(problems))
    return cameras


def sample_from_members(object_id: str, members: Mapping[str, bytes], *, require_depth: bool = True,
                        require_normals: bool = True) -> dict[str, Any]:
    """A WebDataset sample ``{"__key__": sanitize_object_id(object_id), **members}`` (validated)."""
    members = {k: bytes(v) if isinstance(v, (bytearray, memoryview)) else v for k, v in members.items()}
    validate_members(object_id, members, require_depth=require_depth, require_normals=require_normals)
    return {"__key__": sanitize_object_id(object_id), **members}


def sample_from_dir(object_id: str, dir: str | Path, *, require_depth: bool = True,
                    require_normals: bool = True) -> dict[str, Any]:
    """Read a rendered object's directory (local path or ``s3://`` prefix) into a sample.

    Every non-hidden file directly inside ``dir`` becomes a member (file name = member name);
    sub-directories are ignored.
    """
    from geco import storage

    dir = str(dir)
    members: dict[str, bytes] = {}
    for uri in storage.listdir(dir):
        rel = uri[len(dir.rstrip("/")) + 1:]
        if "/" in rel or rel.startswith("."):
            continue
        members[rel] = storage.read_bytes(uri)
    if not members:
        raise SampleError(f"object {object_id!r}: no files in {dir}")
    return sample_from_members(object_id, members, require_depth=require_depth, require_normals=require_normals)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _get(sample: Mapping[str, Any], name: str, key: str) -> Any:
    value = sample.get(name)
    if _missing(value):
        raise SampleError(f"sample {key!r}: missing member {name}")
    return value


def _load_json(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return json.loads(bytes(value))
    if isinstance(value, str):
        return json.loads(value)
    if isinstance(value, np.ndarray):  # a JSON list that went through Arrow / pandas
        return [_plain(v) for v in value.tolist()]
    return _plain(value)


def _plain(value: Any) -> Any:
    """numpy containers (from Ray's Arrow round trip) -> plain Python lists / dicts."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _load_image(value: Any) -> np.ndarray:
    """PNG bytes or an already-decoded uint8 array -> uint8 [H,W,4] (alpha 255 if none)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        from PIL import Image

        with Image.open(io.BytesIO(bytes(value))) as im:
            if im.mode not in ("RGBA", "RGB"):
                im = im.convert("RGBA")
            arr = np.array(im)
    else:
        arr = np.asarray(value)
        if not arr.flags.writeable:  # e.g. arrays handed over by Ray / Arrow
            arr = arr.copy()
    if arr.dtype != np.uint8:
        raise SampleError(f"expected an 8-bit image, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[-1] == 3:
        arr = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 4:
        raise SampleError(f"unexpected image shape {arr.shape}")
    return arr


def _load_npy(value: Any) -> np.ndarray:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.load(io.BytesIO(bytes(value)), allow_pickle=False)
    return np.asarray(value)


def _background(background) -> torch.Tensor | None:
    if background is None:
        return None
    bg = torch.as_tensor(background, dtype=torch.float32).flatten()
    if bg.numel() == 1:
        bg = bg.expand(3)
    if bg.numel() != 3:
        raise ValueError(f"background must be one value or three (RGB in [0,1]), got {background!r}")
    return bg.view(3, 1, 1)


def _decode_view(sample, key, name, cam, bg, with_depth, with_normals) -> dict[str, torch.Tensor]:
    rgba = _load_image(_get(sample, f"{name}.{IMAGE}", key))
    h, w = rgba.shape[:2]
    if cam is not None and "width" in cam and (int(cam["width"]), int(cam["height"])) != (w, h):
        raise SampleError(f"sample {key!r}: {name}.png is {w}x{h} but its camera says "
                          f"{cam['width']}x{cam['height']}")
    t = torch.from_numpy(np.ascontiguousarray(rgba)).permute(2, 0, 1).float().div_(255.0)
    rgb, alpha = t[:3], t[3:4]
    if bg is not None:
        rgb = rgb * alpha + bg * (1.0 - alpha)
    out = {"rgb": rgb, "alpha": alpha}
    if with_depth:
        d = _load_npy(_get(sample, f"{name}.{DEPTH}", key)).astype(np.float32)
        d = d.reshape(h, w) if d.size == h * w else None
        if d is None:
            raise SampleError(f"sample {key!r}: {name}.depth.npy does not match the {w}x{h} image")
        out["depth"] = torch.from_numpy(np.ascontiguousarray(d))[None]
    if with_normals:
        n = _load_image(_get(sample, f"{name}.{NORMAL}", key))
        if n.shape[:2] != (h, w):
            raise SampleError(f"sample {key!r}: {name}.normal.png does not match the {w}x{h} image")
        normal = torch.from_numpy(np.ascontiguousarray(n[..., :3])).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        out["normal"] = normal * (alpha > 0)  # no surface -> 0
    return out


def _camera_matrices(cam: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(K [3,3], w2c OpenCV [4,4]) of a cameras.json entry; stored matrices are checked against
    the orbit fields when both are present (Camera.from_dict raises on a mismatch)."""
    fields = ("kind", "width", "height", "fov_deg", "radius", "azimuth_deg", "elevation_deg")
    if all(f in cam for f in fields):
        from geco.cameras import Camera

        c = Camera.from_dict({k: v for k, v in cam.items() if k in fields + ("K", "w2c")})
        K = np.asarray(cam["K"], np.float64) if "K" in cam else c.K
        w2c = np.asarray(cam["w2c"], np.float64) if "w2c" in cam else c.w2c_opencv
        return K, w2c
    if "K" in cam and "w2c" in cam:
        return np.asarray(cam["K"], np.float64), np.asarray(cam["w2c"], np.float64)
    raise SampleError(f"camera {cam.get('name')!r} has neither orbit fields nor K and w2c")


def _select(names: list[str], views) -> list[str]:
    if views is None or views == "none":
        return []
    if views == "all":
        return list(names)
    if isinstance(views, str):
        raise TypeError(f"views must be 'all', 'none' or a list of view names / indices, got {views!r}")
    wanted = [f"{v:03d}" if isinstance(v, (int, np.integer)) else str(v) for v in views]
    unknown = [v for v in wanted if v not in names]
    if unknown:
        raise SampleError(f"views {unknown} not in this sample (it has {names[:3]}...{names[-1:]})")
    return wanted


def decode_sample(sample: Mapping[str, Any], background=(1.0, 1.0, 1.0), views="all",
                  with_depth: bool = True, with_normals: bool = True) -> dict[str, Any]:
    """Decode one sample into torch tensors in the project's conventions.

    Args:
        sample: ``{"__key__": ..., "cond.png": bytes, "000.png": bytes, ...}`` - raw bytes, or the
            values of Ray's default WebDataset decoder (arrays / parsed JSON). Missing columns
            that pandas filled with NaN/None count as absent.
        background: RGB in [0,1] (or one grey value) composited under the stored RGBA at load
            time; ``None`` returns the stored straight RGB unchanged. Default white.
        views: ``"all"``, ``"none"`` or a list of view names (``"003"``) / indices (``3``).
        with_depth, with_normals: decode ``NNN.depth.npy`` / ``NNN.normal.png`` (also for cond,
            where present).

    Returns a dict:
        ``key``; ``cond_rgb`` [3,H,W] float in [0,1] (composited), ``cond_alpha`` [1,H,W],
        ``cond_K`` [3,3], ``cond_w2c`` [4,4] (world-to-camera, OpenCV) and, when present and
        asked for, ``cond_depth`` [1,H,W] / ``cond_normal`` [3,H,W];
        one entry per view group present among the selected views - ``zero123`` (the 6
        Zero123++ views) and ``random`` - each ``{"rgb" [V,3,H,W], "alpha" [V,1,H,W],
        "depth" [V,1,H,W] float32 (0 = no surface), "normal" [V,3,H,W] in [-1,1] (0 where
        alpha is 0), "K" [V,3,3], "w2c" [V,4,4], "names": [...]}``; views are grouped by their
        camera ``kind`` (same kind = same resolution, which is checked);
        ``cameras`` (the cameras.json list) and ``meta`` (the meta.json dict).
    """
    key = str(sample.get("__key__", "?"))
    cameras = _load_json(_get(sample, "cameras.json", key))
    meta_value = sample.get("meta.json")
    meta = {} if _missing(meta_value) else _load_json(meta_value)
    if not isinstance(cameras, list) or not cameras:
        raise SampleError(f"sample {key!r}: cameras.json must be a non-empty list")
    names = _camera_names(cameras)
    by_name = dict(zip(names, cameras))
    bg = _background(background)

    out: dict[str, Any] = {"key": key}
    cond_cam = by_name.get("cond", cameras[0])
    cond_depth = with_depth and not _missing(sample.get(f"cond.{DEPTH}"))
    cond_normals = with_normals and not _missing(sample.get(f"cond.{NORMAL}"))
    cond = _decode_view(sample, key, "cond", cond_cam, bg, cond_depth, cond_normals)
    out["cond_rgb"], out["cond_alpha"] = cond["rgb"], cond["alpha"]
    if cond_depth:
        out["cond_depth"] = cond["depth"]
    if cond_normals:
        out["cond_normal"] = cond["normal"]
    K, w2c = _camera_matrices(cond_cam)
    out["cond_K"] = torch.from_numpy(K).float()
    out["cond_w2c"] = torch.from_numpy(w2c).float()

    groups: dict[str, dict[str, list]] = {}
    for name in _select(names[1:], views):
        cam = by_name[name]
        kind = str(cam.get("kind", "random"))
        view = _decode_view(sample, key, name, cam, bg, with_depth, with_normals)
        K, w2c = _camera_matrices(cam)
        g = groups.setdefault(kind, {"names": []})
        g["names"].append(name)
        for field, value in view.items():
            g.setdefault(field, []).append(value)
        g.setdefault("K", []).append(torch.from_numpy(K).float())
        g.setdefault("w2c", []).append(torch.from_numpy(w2c).float())
    for kind, g in groups.items():
        shapes = {tuple(t.shape) for t in g["rgb"]}
        if len(shapes) > 1:
            raise SampleError(f"sample {key!r}: {kind} views have different sizes {sorted(shapes)}")
        out[kind] = {f: (v if f == "names" else torch.stack(v)) for f, v in g.items()}
    out["cameras"] = cameras
    out["meta"] = meta
    return out
