"""Import upstream model weights into our storage as safetensors, with a checksum manifest.

    import_weights("path/to/zero123plus-v1.2", "s3://bucket/weights/zero123plus-v1.2")
    verify_weights("s3://bucket/weights/zero123plus-v1.2").ok

Sources (``kind``): a local folder or file ("local"), an ``s3://`` prefix or object ("s3"), or a
Hugging Face Hub id ``owner/name[@revision]`` / ``hf://owner/name`` ("hf", through
``huggingface_hub.snapshot_download``, which also serves a copy already in the local HF cache
when offline). "auto" picks by the string: ``s3://`` -> s3, an existing path -> local,
``owner/name`` -> hf.

What is written under ``dest`` (a local folder or ``s3://`` prefix, via :mod:`geco.storage`):
- pickled state dicts (``.bin``, ``.pth``, ``.pt``, ``.ckpt``) are read with
  ``torch.load(weights_only=True)`` (a file holding other pickled objects is refused) and
  re-saved as ``.safetensors`` at the same relative path with the new suffix; a nested
  ``"state_dict"`` (Lightning checkpoints) is unwrapped and non-tensor entries are dropped, with
  a note. transformers' names follow its convention: ``pytorch_model*.bin`` ->
  ``model*.safetensors`` (what ``from_pretrained`` looks for), and a ``*.bin.index.json`` shard
  index is rewritten to the new names. A pickle whose ``.safetensors`` twin already exists in the
  source is skipped (the twin is copied).
- every other file (``.safetensors``, configs, ``.json``, ``.txt``, tokenizer files, ...) is
  copied byte for byte. Hidden files and folders (``.git``, ``.cache``) are skipped.
- ``weights-manifest.json`` last: sha256 and size of every file, the source, the time, notes.
  A folder without it is an unfinished import. :func:`verify_weights` re-checks the checksums.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from geco import storage

log = logging.getLogger(__name__)

MANIFEST = "weights-manifest.json"
MANIFEST_FORMAT = "geco-weights-manifest/1"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
_HF_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")


class WeightsImportError(RuntimeError):
    """An import that cannot proceed, with a reason a user can act on."""


# -- naming ----------------------------------------------------------------------------------
def safetensors_name(rel: str) -> str:
    """Relative path a pickled state dict is re-saved under."""
    parent, _, name = rel.rpartition("/")
    stem = name.rsplit(".", 1)[0]
    if stem.startswith("pytorch_model"):  # transformers: pytorch_model[-0000k-of-0000n].bin
        stem = "model" + stem[len("pytorch_model"):]
    return f"{parent}/{stem}.safetensors" if parent else f"{stem}.safetensors"


def _index_target(rel: str) -> str | None:
    """``X.bin.index.json`` -> ``safetensors_name(X.bin) + .index.json``; None for other files."""
    if not rel.endswith(".index.json"):
        return None
    inner = rel[: -len(".index.json")]
    if not inner.endswith(PICKLE_SUFFIXES):
        return None
    return safetensors_name(inner) + ".index.json"


# -- sources ---------------------------------------------------------------------------------
def _resolve_kind(src: str, kind: str) -> str:
    if kind not in ("auto", "local", "s3", "hf"):
        raise WeightsImportError(f"kind must be auto, local, s3 or hf, got {kind!r}")
    if kind != "auto":
        return kind
    if storage.is_s3(src):
        return "s3"
    if src.startswith("hf://"):
        return "hf"
    if Path(src).expanduser().exists():
        return "local"
    if _HF_ID.match(src):
        return "hf"
    raise WeightsImportError(f"{src}: no such file or directory (and not an owner/name Hub id)")


def _hf_snapshot(src: str) -> Path:
    m = _HF_ID.match(src)
    if not m:
        raise WeightsImportError(f"{src!r} is not a Hugging Face Hub id (owner/name[@revision])")
    repo_id, revision = m.group(1), m.group(2)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsImportError(f"cannot fetch {repo_id!r}: huggingface_hub is not installed; pass a "
                                 "local copy of the model folder instead") from None
    try:
        # huggingface_hub reads HF_HOME/HF_HUB_CACHE once at import; honour them as they are now
        cache = os.environ.get("HF_HUB_CACHE") or (
            str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None)
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache))
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise WeightsImportError(
            f"cannot fetch {repo_id + ('@' + revision if revision else '')!r} from the Hugging Face Hub "
            f"({'HF_HUB_OFFLINE is set; ' if offline else ''}{why}). Without network access, download "
            f"it where the Hub is reachable and pass the local folder (or an s3:// copy) as the "
            f"source instead.") from None


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


@dataclass
class _Source:
    root_uri: str  # for messages and the manifest
    files: dict[str, str]  # relative path -> local path or s3 URI
    kind: str


def _list_source(src: str, kind: str) -> _Source:
    if kind == "hf":
        root = _hf_snapshot(src)
        files = {p.relative_to(root).as_posix(): str(p) for p in sorted(root.rglob("*")) if p.is_file()}
        return _Source(src, files, kind)
    if kind == "s3":
        if storage.exists(src):  # a single object
            return _Source(src, {storage.basename(src): src}, kind)
        prefix = src.rstrip("/")
        files = {u[len(prefix) + 1:]: u for u in storage.listdir(prefix)}
        if not files:
            raise WeightsImportError(f"{src}: no objects under this S3 prefix")
        return _Source(src, files, kind)
    p = Path(src).expanduser()
    if p.is_file():
        return _Source(str(p), {p.name: str(p)}, kind)
    if not p.is_dir():
        raise WeightsImportError(f"{src}: no such file or directory")
    files = {q.relative_to(p).as_posix(): str(q) for q in sorted(p.rglob("*")) if q.is_file()}
    if not files:
        raise WeightsImportError(f"{src}: empty folder")
    return _Source(str(p), files, kind)


def _local(path_or_uri: str, tmpdir: Path) -> Path:
    """A local file for one source file (an S3 object is copied into ``tmpdir``, removed after use)."""
    return storage.local_copy(path_or_uri, cache_dir=tmpdir / "src")


# -- conversion ------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict:
    """Tensors from a ``.safetensors`` file, or from a torch pickle (``.bin``/``.pth``/``.ckpt``)
    read with ``weights_only=True`` (a nested ``state_dict`` unwrapped). The one reader of weight
    files in the project; raises :class:`WeightsImportError` naming the file otherwise."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return load_state_dict(path)[0]


def load_state_dict(path: str | os.PathLike, rel: str = "") -> tuple[dict, list[str]]:
    """A pickled state dict read with ``weights_only=True`` -> (tensors, notes). Raises
    :class:`WeightsImportError` for files holding pickled objects other than tensors."""
    import torch

    name = rel or str(path)
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy format
    except Exception as e:
        msg = str(e)
        if "weights_only" in msg or "Unsupported global" in msg or type(e).__name__ == "UnpicklingError":
            first = next((ln.strip() for ln in msg.splitlines() if "Unsupported" in ln or "GLOBAL" in ln), "")
            raise WeightsImportError(
                f"{name}: refused: it holds pickled Python objects, not only tensors "
                f"(torch.load(weights_only=True) failed{': ' + first if first else ''}). Loading it "
                f"would run arbitrary code; re-save just its state dict (or safetensors) from a "
                f"trusted environment and import that.") from None
        raise WeightsImportError(f"{name}: cannot be read as a torch state dict "
                                 f"({type(e).__name__}: {msg.splitlines()[0] if msg else ''})") from None
    notes: list[str] = []
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        others = [k for k in obj if k != "state_dict"]
        obj = obj["state_dict"]
        notes.append(f"{name}: unwrapped nested 'state_dict'"
                     + (f" (dropped {_few(others)})" if others else ""))
    if not isinstance(obj, dict):
        raise WeightsImportError(f"{name}: holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    dropped = [str(k) for k in obj if k not in tensors]
    if dropped:
        notes.append(f"{name}: dropped {len(dropped)} non-tensor entr{'y' if len(dropped) == 1 else 'ies'} "
                     f"({_few(dropped)})")
    if not tensors:
        raise WeightsImportError(f"{name}: no tensors in it")
    return tensors, notes


def _few(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f", … {len(keys) - n} more" if len(keys) > n else "")


def _save_safetensors(tensors: dict, out: Path, rel: str) -> list[str]:
    """safetensors refuses shared or non-contiguous storage: such tensors are copied."""
    import torch
    from safetensors.torch import save_file

    seen: set[int] = set()
    ready, copied = {}, []
    for k, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        whole = t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if (ptr in seen and t.numel()) or not whole:
            t = t.clone(memory_format=torch.contiguous_format)
            copied.append(k)
        seen.add(ptr)
        ready[k] = t
    save_file(ready, str(out), metadata={"format": "pt"})
    return [f"{rel}: {len(copied)} shared or strided tensor(s) stored as copies ({_few(copied)})"] if copied else []


# -- import ----------------------------------------------------------------------------------
def import_weights(src: str, dest: str, *, kind: str = "auto", overwrite: bool = False) -> str:
    """Copy ``src`` into ``dest`` as safetensors (see the module doc); returns the manifest URI.

    Refuses a ``dest`` that already holds a manifest unless ``overwrite`` (files are then
    replaced one by one; the new manifest lists only the new import)."""
    src, dest = str(src), str(dest).rstrip("/")
    kind = _resolve_kind(src, kind)
    manifest_uri = storage.join(dest, MANIFEST)
    if storage.is_s3(dest):  # reach the bucket before a long download (no side effects)
        storage.check_writable(dest)
    if storage.exists(manifest_uri) and not overwrite:
        raise WeightsImportError(f"{dest} already holds an import ({MANIFEST}); pass overwrite=True "
                                 "(--overwrite) to replace it")
    source = _list_source(src, kind)
    storage.check_writable(dest)  # locally this creates the folder: only once the source is there
    files = {rel: loc for rel, loc in source.files.items() if not _hidden(rel) and rel != MANIFEST}
    notes: list[str] = []
    skipped = sorted(set(source.files) - set(files))
    if skipped:
        notes.append(f"skipped hidden/manifest files: {_few(skipped)}")
    entries: list[dict[str, Any]] = []
    targets: dict[str, str] = {}

    def put(local: Path, rel: str, entry: dict[str, Any]) -> None:
        if rel in targets:
            raise WeightsImportError(f"{targets[rel]} and {entry['source_path']} would both become {rel}")
        targets[rel] = entry["source_path"]
        entry = {"path": rel, "sha256": _sha256_file(local), "size": local.stat().st_size, **entry}
        storage.upload(local, storage.join(dest, rel))
        entries.append(entry)
        log.info("imported %s -> %s", entry["source_path"], storage.join(dest, rel))

    with tempfile.TemporaryDirectory(prefix="geco-weights-") as tmp:
        tmpdir = Path(tmp)
        for rel in sorted(files):
            loc = files[rel]
            if rel.endswith(PICKLE_SUFFIXES):
                target = safetensors_name(rel)
                twin = rel.rsplit(".", 1)[0] + ".safetensors"
                if target in files or twin in files:
                    notes.append(f"{rel}: skipped, its safetensors twin is in the source")
                    continue
                local = _local(loc, tmpdir)
                tensors, n = load_state_dict(local, rel)
                notes += n
                out = tmpdir / "out" / target
                out.parent.mkdir(parents=True, exist_ok=True)
                notes += _save_safetensors(tensors, out, rel)
                put(out, target, {"source_path": rel, "converted": "torch.load(weights_only=True) -> safetensors",
                                  "tensors": len(tensors)})
                del tensors
                out.unlink()
                if storage.is_s3(loc):
                    local.unlink(missing_ok=True)
                continue
            index_target = _index_target(rel)
            if index_target is not None and index_target not in files:
                local = _local(loc, tmpdir)
                index = json.loads(local.read_text())
                wm = index.get("weight_map", {})
                index["weight_map"] = {k: safetensors_name(v) if v.endswith(PICKLE_SUFFIXES) else v
                                       for k, v in wm.items()}
                out = tmpdir / "out" / index_target
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(index, indent=2) + "\n")
                put(out, index_target, {"source_path": rel, "converted": "shard index renamed to safetensors"})
                continue
            if index_target is not None:
                notes.append(f"{rel}: skipped, its safetensors twin is in the source")
                continue
            local = _local(loc, tmpdir)
            put(local, rel, {"source_path": rel})
            if storage.is_s3(loc):
                local.unlink(missing_ok=True)

    manifest = {
        "format": MANIFEST_FORMAT,
        "source": src,
        "source_kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": sorted(entries, key=lambda e: e["path"]),
        "notes": notes,
    }
    storage.write_text(manifest_uri, json.dumps(manifest, indent=2) + "\n")  # last: marks it whole
    for n in notes:
        log.info("note: %s", n)
    return manifest_uri


# -- verify ----------------------------------------------------------------------------------
@dataclass
class VerifyResult:
    manifest: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # files present but not in the manifest

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{'OK' if self.ok else 'FAILED'}: {self.checked} file(s) checked against {self.manifest}"
        lines = [head] + [f"  problem: {p}" for p in self.problems]
        lines += [f"  not in manifest: {e}" for e in self.extra]
        return "\n".join(lines)


def _sha256_uri(uri: str) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with storage.open_read(uri) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def read_manifest(dest: str) -> dict:
    dest = str(dest).rstrip("/")
    uri = dest if dest.endswith(MANIFEST) else storage.join(dest, MANIFEST)
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise WeightsImportError(f"{uri}: no manifest (not an import, or an unfinished one)") from None


def verify_weights(dest: str) -> VerifyResult:
    """Re-hash every file the manifest lists; sizes and sha256 must match."""
    dest = str(dest).rstrip("/")
    if dest.endswith("/" + MANIFEST) or dest == MANIFEST:
        dest = dest[: -len(MANIFEST)].rstrip("/")
    manifest = read_manifest(dest)
    res = VerifyResult(storage.join(dest, MANIFEST))
    listed = set()
    for e in manifest.get("files", []):
        uri = storage.join(dest, e["path"])
        listed.add(e["path"])
        res.checked += 1
        try:
            digest, size = _sha256_uri(uri)
        except FileNotFoundError:
            res.problems.append(f"{e['path']}: missing")
            continue
        if size != e["size"]:
            res.problems.append(f"{e['path']}: size {size} != {e['size']} in the manifest")
        elif digest != e["sha256"]:
            res.problems.append(f"{e['path']}: sha256 {digest[:12]}… != {e['sha256'][:12]}… in the manifest")
    prefix = dest if storage.is_s3(dest) else str(Path(dest))
    for uri in storage.listdir(prefix):
        rel = uri[len(prefix) + 1:] if storage.is_s3(dest) else Path(uri).relative_to(prefix).as_posix()
        if rel != MANIFEST and rel not in listed:
            res.extra.append(rel)
    return res


def iter_files(dest: str) -> Iterator[tuple[str, dict]]:
    """(URI, manifest entry) for every imported file."""
    for e in read_manifest(dest).get("files", []):
        yield storage.join(str(dest).rstrip("/"), e["path"]), e


__all__ = ["MANIFEST", "VerifyResult", "WeightsImportError", "import_weights", "iter_files",
           "load_state_dict", "read_manifest", "safetensors_name", "verify_weights"]
