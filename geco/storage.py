"""One place for URIs: local paths and ``s3://bucket/key``.

Every stage reads and writes through these functions, so a config can point any input or output
at a local folder or an S3 prefix. S3 endpoint and credentials come from the standard AWS
environment/config chain (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws/config`` ...),
never from our YAML, and are never logged.

Atomic commit: :func:`atomic_writer` makes an object visible only when it is whole. Locally it
writes ``.<name>.tmp-<random>`` beside the target and ``os.replace``s it. On S3 a PUT (or a
completed multipart upload) is itself atomic: readers never see a partial object, and an upload
that fails midway is aborted and leaves nothing; the bytes are spooled to a local temporary file
first so nothing is sent until the writer closes without error.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import IO, Callable, Iterator


class StorageError(RuntimeError):
    """A storage problem a user can fix (wrong URI, unreachable endpoint, missing credentials)."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r}: an S3 URI needs a bucket, e.g. s3://my-bucket/prefix")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or S3 URI with ``/``."""
    out = str(uri).rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None):
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60)
    return boto3.client("s3", endpoint_url=endpoint or None, config=cfg)


def s3_endpoint() -> str | None:
    """The S3 endpoint from the standard AWS environment (None: AWS's own)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client():
    """A boto3 S3 client for the endpoint in the environment (cached per process and endpoint)."""
    return _client(s3_endpoint())


def _is_missing(err: Exception) -> bool:
    code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound")


# -- reading ---------------------------------------------------------------------------------
def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as e:  # botocore ClientError
            if _is_missing(e):
                raise FileNotFoundError(uri) from None
            raise
    return Path(uri).read_bytes()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """A streaming binary reader (S3 bodies are streamed, not loaded whole)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as e:
            if _is_missing(e):
                raise FileNotFoundError(uri) from None
            raise
        try:
            yield body
        finally:
            body.close()
    else:
        with open(uri, "rb") as f:
            yield f


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:
            if _is_missing(e):
                return False
            raise
    return Path(uri).exists()


def stat(uri: str) -> dict:
    """``{"size": bytes, "etag": str}``; etag is S3's ETag or ``mtime_ns-size`` locally."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            h = s3_client().head_object(Bucket=bucket, Key=key)
        except Exception as e:
            if _is_missing(e):
                raise FileNotFoundError(uri) from None
            raise
        return {"size": h["ContentLength"], "etag": h["ETag"].strip('"')}
    st = Path(uri).stat()
    return {"size": st.st_size, "etag": f"{st.st_mtime_ns}-{st.st_size}"}


def listdir(prefix: str, suffix: str = "") -> list[str]:
    """All objects/files under ``prefix`` (recursively), as full URIs, sorted; hidden temporary
    files (``.*.tmp-*``) are never listed."""
    out: list[str] = []
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                out.append(f"s3://{bucket}/{obj['Key']}")
    else:
        root = Path(prefix)
        if root.is_dir():
            out = [str(p) for p in root.rglob("*") if p.is_file()]
    return sorted(u for u in out if u.endswith(suffix) and ".tmp-" not in basename(u))


# -- writing ---------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_writer(uri: str) -> Iterator[IO[bytes]]:
    """Write a file that becomes visible at ``uri`` only if the block finishes without error."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with tempfile.NamedTemporaryFile(prefix="geco-upload-", suffix=".tmp") as tmp:
            yield tmp
            tmp.flush()
            tmp.seek(0)
            s3_client().upload_fileobj(tmp, bucket, key)  # multipart is aborted on failure
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid@host in the name lets a later run tell a killed writer's leftover from a live
    # one (geco.data.shards.clean_stale_temporaries)
    tmp_path = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}-{os.getpid()}@{socket.gethostname()}"
    try:
        with open(tmp_path, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_writer(uri) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def delete(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def download(uri: str, local_path: str | Path) -> Path:
    """Copy ``uri`` to a local file (atomically) and return its path."""
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_path.with_name(f".{local_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                s3_client().download_file(bucket, key, str(tmp))
            except Exception as e:
                if _is_missing(e):
                    raise FileNotFoundError(uri) from None
                raise
        else:
            shutil.copyfile(uri, tmp)
        os.replace(tmp, local_path)
    finally:
        tmp.unlink(missing_ok=True)
    return local_path


def upload(local_path: str | Path, uri: str) -> None:
    with open(local_path, "rb") as src, atomic_writer(uri) as dst:
        shutil.copyfileobj(src, dst, length=8 << 20)


def write_folder(dest: str, write: Callable[[Path], None], *, marker: str, what: str) -> str:
    """Write a folder of files (a checkpoint, a model) to a local path or an ``s3://`` prefix so
    that readers never see it half-written. ``write(root)`` fills a local temporary folder whose
    top-level file ``marker`` says "this folder is whole".

    Locally the temporary folder is renamed into place; an existing folder is replaced only if it
    holds ``marker`` (it is one of ours: a ``what``), any other non-empty folder is refused. On S3
    the files are uploaded with ``marker`` last, so its presence means every other file is there.
    """
    dest = str(dest)
    if is_s3(dest):
        with tempfile.TemporaryDirectory(prefix="geco-upload-") as tmp:
            write(Path(tmp))
            files = sorted((p for p in Path(tmp).rglob("*") if p.is_file()),
                           key=lambda p: (p.relative_to(tmp).as_posix() == marker, p.as_posix()))
            for p in files:
                upload(p, join(dest, p.relative_to(tmp).as_posix()))
        return dest
    target = Path(dest).expanduser()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / marker).is_file())):
        raise FileExistsError(f"{target}: exists and is not a {what}; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


# -- checks ----------------------------------------------------------------------------------
def check_writable(uri: str) -> None:
    """Fail fast, before any work starts, when ``uri`` cannot be written.

    For S3 this reaches the endpoint and the bucket; the error says which endpoint was tried and
    how to point at another one (never the credentials).
    """
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        endpoint = s3_endpoint() or "AWS default"
        try:
            s3_client().head_bucket(Bucket=bucket)
        except Exception as e:
            name = type(e).__name__
            if _is_missing(e) or "NoSuchBucket" in str(e):
                raise StorageError(f"{uri}: bucket {bucket!r} does not exist at endpoint {endpoint}; "
                                   "create it or fix the output URI") from None
            if "Credentials" in name:
                raise StorageError(f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID/"
                                   "AWS_SECRET_ACCESS_KEY or an AWS profile") from None
            raise StorageError(f"{uri}: cannot reach S3 endpoint {endpoint} ({name}: {e}); check "
                               "AWS_ENDPOINT_URL and that the server is up") from None
    else:
        p = Path(uri)
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"{uri}: cannot create output directory ({e})") from None
        if not os.access(p, os.W_OK):
            raise StorageError(f"{uri}: output directory is not writable")


def check_readable(uri: str) -> None:
    """Fail fast when an input URI (file or prefix) cannot be read."""
    if is_s3(uri):
        bucket = split_s3(uri)[0]
        try:
            s3_client().head_bucket(Bucket=bucket)
        except Exception as e:
            endpoint = s3_endpoint() or "AWS default"
            raise StorageError(f"{uri}: cannot read from S3 endpoint {endpoint} ({type(e).__name__}: {e}); "
                               "check AWS_ENDPOINT_URL, credentials and the bucket name") from None
    elif not Path(uri).exists():
        raise StorageError(f"{uri}: no such file or directory")
