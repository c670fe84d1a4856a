"""One place for URIs: local paths and ``s3://bucket/key``.

Every stage reads and writes through these functions, so a config can point any input or output
at a local folder or an S3 prefix. S3 endpoint and credentials come from the standard AWS
environment/config chain (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws/config`` ...),
never from our YAML, and are never logged.

S3 timeouts and retries are configured the same way, from the environment (each node's, so Ray
workers see the driver's on a local cluster and their node's elsewhere), never from YAML:

- ``GECO_S3_CONNECT_TIMEOUT``: seconds to open a connection (default 5);
- ``GECO_S3_READ_TIMEOUT``: seconds to wait for any bytes of an answer (default 30): a stalled
  server (up but not answering) fails after about attempts x this, not after minutes;
- ``GECO_S3_MAX_ATTEMPTS``: tries per request, the first included (default 3; botocore's
  "standard" retry mode: timeouts, connection errors, throttling and 5xx are retried).

The pyarrow S3 filesystem Ray Data and Ray Train use (``pipelines/cluster.py``) takes the same
settings from :func:`s3_settings`.

Errors: every S3 call goes through :func:`s3_errors`, which turns botocore's exceptions into the
project's own, one line each, naming the URI and the fix: :class:`S3EndpointError` (endpoint
unreachable or not answering), :class:`S3CredentialsError` (credentials missing, rejected or
without permission), :class:`S3BucketError` (no such bucket, invalid name), or the base
:class:`StorageError`; a missing object is ``FileNotFoundError(uri)``, as for a local path.

Atomic commit: :func:`atomic_writer` makes an object visible only when it is whole. Locally it
writes ``.<name>.tmp-<random>`` beside the target and ``os.replace``s it. On S3 a PUT (or a
completed multipart upload) is itself atomic: readers never see a partial object, and an upload
that fails midway is aborted and leaves nothing; the bytes are spooled to a local temporary file
first so nothing is sent until the writer closes without error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import IO, Callable, Iterator


class StorageError(RuntimeError):
    """A storage problem a user can fix (wrong URI, unreachable endpoint, missing credentials)."""


class S3EndpointError(StorageError):
    """The S3 endpoint cannot be reached (refused, reset, DNS) or does not answer in time."""


class S3CredentialsError(StorageError):
    """No credentials, credentials the endpoint rejects, or credentials without permission."""


class S3BucketError(StorageError):
    """The bucket does not exist or its name is not a valid bucket name."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def has_scheme(uri: str) -> bool:
    """``s3://...``, ``procedural://...``, ``sqlite:///...`` (not a Windows drive letter or a plain path)."""
    return len(urllib.parse.urlsplit(str(uri)).scheme) > 1


def absolute_uri(uri: str) -> str:
    """A local path made absolute (``~`` expanded); URIs with a scheme and ``""`` unchanged. Renderers
    and Ray workers run with another working directory, so nothing hands them relative paths."""
    if not uri or has_scheme(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


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


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """Timeouts (seconds) and tries per request for every S3 client; see the module docstring."""

    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 3


_SETTINGS_ENV = {"connect_timeout": "GECO_S3_CONNECT_TIMEOUT", "read_timeout": "GECO_S3_READ_TIMEOUT",
                 "max_attempts": "GECO_S3_MAX_ATTEMPTS"}


def s3_settings() -> S3Settings:
    """The S3 timeouts and retries from ``GECO_S3_*`` (defaults where unset); a bad value is a
    :class:`StorageError` naming the variable."""
    values: dict = {}
    for name, var in _SETTINGS_ENV.items():
        text = os.environ.get(var, "").strip()
        if not text:
            continue
        integer = name == "max_attempts"
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value >= 1 if integer else value > 0)):
            want = "a whole number >= 1, e.g. 3" if integer else "a finite number of seconds > 0, e.g. 30"
            raise StorageError(f"{var}={text!r}: expected {want}")
        values[name] = value
    return S3Settings(**values)


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, settings: S3Settings = S3Settings()):
    # boto3 is imported here, not at the top: it takes a while and most runs never touch S3.
    import boto3
    from botocore.config import Config

    # total_max_attempts counts the first try (botocore's "max_attempts" would not)
    cfg = Config(retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
                 connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout)
    # A session of its own: boto3's default session keeps the first credentials it found for the
    # process, so a cleared cache would not see new ones.
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=cfg)


def s3_endpoint() -> str | None:
    """The S3 endpoint from the standard AWS environment (None: AWS's own)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client():
    """A boto3 S3 client for the endpoint and :func:`s3_settings` in the environment (cached per
    process, endpoint and settings)."""
    return _client(s3_endpoint(), s3_settings())


def _transfer_config():
    """s3transfer's own retries of a broken download stream follow ``GECO_S3_MAX_ATTEMPTS`` too."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(num_download_attempts=s3_settings().max_attempts)


# -- errors ----------------------------------------------------------------------------------
_MISSING = ("404", "NoSuchKey", "NotFound")
_BAD_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "InvalidClientTokenId", "AuthorizationHeaderMalformed")
_DENIED = ("403", "AccessDenied", "AllAccessDisabled", "Forbidden")
_NO_BUCKET = ("NoSuchBucket",)
_BAD_BUCKET = ("InvalidBucketName",)


def _code(err: BaseException) -> str:
    """The S3 error code of a botocore ClientError ("" for anything else, which has no response)."""
    response = getattr(err, "response", None) or {}
    return str((response.get("Error") or {}).get("Code", ""))


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _translate(err: BaseException, uri: str, elapsed: float, missing: str) -> BaseException | None:
    """The project's exception for a botocore/s3transfer error, or None (not a storage error)."""
    # Lazy: botocore is only imported by the time an S3 call has failed.
    from botocore import exceptions as bx

    err = getattr(err, "last_exception", None) or err  # s3transfer: retries of a download exhausted
    endpoint = s3_endpoint() or "(AWS default)"
    bucket = split_s3(uri)[0] if is_s3(uri) else "?"
    code = _code(err)
    if isinstance(err, bx.ClientError):
        if code in _MISSING and missing == "key":
            return FileNotFoundError(uri)
        if code in _NO_BUCKET or (code in _MISSING and missing == "bucket"):
            return S3BucketError(f"{uri}: bucket {bucket!r} does not exist at S3 endpoint {endpoint}; "
                                 "create it or fix the URI")
        if code in _BAD_BUCKET:
            return S3BucketError(f"{uri}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, "
                                 "digits, dots and hyphens); fix the URI")
        if code in _BAD_CREDENTIALS:
            return S3CredentialsError(f"{uri}: S3 endpoint {endpoint} rejected the credentials ({code}); "
                                      "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS profile")
        if code in _DENIED:
            return S3CredentialsError(f"{uri}: access denied by S3 endpoint {endpoint} ({code}); check "
                                      "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the AWS profile) and "
                                      f"that they may use bucket {bucket!r}")
        message = (getattr(err, "response", None) or {}).get("Error", {}).get("Message", "")
        return StorageError(f"{uri}: S3 endpoint {endpoint} answered {code or 'an error'}"
                            f"{': ' + _one_line(message) if message else ''}; check the server's log or retry later")
    if isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
        return S3CredentialsError(f"{uri}: no AWS credentials found ({_one_line(err)}); set "
                                  "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile")
    if isinstance(err, bx.ParamValidationError) and "bucket" in str(err).lower():
        return S3BucketError(f"{uri}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, "
                             "dots and hyphens); fix the URI")
    if isinstance(err, (bx.ReadTimeoutError, bx.ConnectTimeoutError)):
        st = s3_settings()
        return S3EndpointError(
            f"S3 endpoint {endpoint} not answering (timed out after {elapsed:.0f} s): {uri}; check that the "
            f"server is up, or raise GECO_S3_CONNECT_TIMEOUT/GECO_S3_READ_TIMEOUT/GECO_S3_MAX_ATTEMPTS "
            f"(now {st.connect_timeout:g} s/{st.read_timeout:g} s/{st.max_attempts})")
    if isinstance(err, (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError, ConnectionError)):
        return S3EndpointError(f"{uri}: cannot reach S3 endpoint {endpoint} ({type(err).__name__}: "
                               f"{_one_line(err)}); check AWS_ENDPOINT_URL and that the server is up")
    if isinstance(err, bx.BotoCoreError):
        return StorageError(f"{uri}: S3 request failed ({type(err).__name__}: {_one_line(err)})")
    return None


@contextlib.contextmanager
def s3_errors(uri: str, *, missing: str = "key") -> Iterator[None]:
    """Raise the project's exception for a botocore/s3transfer error inside the block (one line,
    naming ``uri``, the endpoint and the fix; botocore's chain is dropped); other exceptions pass
    through. ``missing``: what a 404 means, ``"key"`` (``FileNotFoundError(uri)``) or ``"bucket"``
    (:class:`S3BucketError`, e.g. for HeadBucket)."""
    t0 = time.monotonic()
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        translated = _translate(e, uri, time.monotonic() - t0, missing)
        if translated is None:
            raise
        raise translated from None


class _S3Stream:
    """A streaming S3 body whose reads raise :func:`s3_errors`' exceptions (a server lost mid-read)."""

    def __init__(self, body, uri: str):
        self._body, self._uri = body, uri

    def read(self, *args):
        with s3_errors(self._uri):
            return self._body.read(*args)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._body.close()


# -- reading ---------------------------------------------------------------------------------
def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """A streaming binary reader (S3 bodies are streamed, not loaded whole)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        try:
            yield _S3Stream(body, uri)
        finally:
            body.close()
    else:
        with open(uri, "rb") as f:
            yield f


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            with s3_errors(uri):
                s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except FileNotFoundError:
            return False
    return Path(uri).exists()


def stat(uri: str) -> dict:
    """``{"size": bytes, "etag": str}``; etag is S3's ETag or ``mtime_ns-size`` locally."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            h = s3_client().head_object(Bucket=bucket, Key=key)
        return {"size": h["ContentLength"], "etag": h["ETag"].strip('"')}
    st = Path(uri).stat()
    return {"size": st.st_size, "etag": f"{st.st_mtime_ns}-{st.st_size}"}


def list_stats(prefix: str) -> dict[str, dict]:
    """``{uri: {"size", "etag"}}`` (as :func:`stat` gives them) of every object/file under ``prefix``,
    recursively, from one listing (no request per object); hidden temporary files (``.*.tmp-*``) are
    never listed."""
    out: dict[str, dict] = {}
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        with s3_errors(prefix, missing="bucket"):
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    out[f"s3://{bucket}/{obj['Key']}"] = {"size": obj["Size"], "etag": obj["ETag"].strip('"')}
    else:
        root = Path(prefix)
        if root.is_dir():
            out = {str(p): stat(str(p)) for p in root.rglob("*") if p.is_file()}
    return {u: s for u, s in out.items() if ".tmp-" not in basename(u)}


def listdir(prefix: str, suffix: str = "") -> list[str]:
    """All objects/files under ``prefix`` (recursively), as full URIs, sorted; hidden temporary
    files (``.*.tmp-*``) are never listed."""
    return sorted(u for u in list_stats(prefix) if u.endswith(suffix))


# -- writing ---------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_writer(uri: str) -> Iterator[IO[bytes]]:
    """Write a file that becomes visible at ``uri`` only if the block finishes without error."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with tempfile.NamedTemporaryFile(prefix="geco-upload-", suffix=".tmp") as tmp:
            yield tmp  # the block's own exceptions pass through untouched
            tmp.flush()
            tmp.seek(0)
            with s3_errors(uri, missing="bucket"):
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
        with s3_errors(uri, missing="bucket"):
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
            with s3_errors(uri):
                s3_client().download_file(bucket, key, str(tmp), Config=_transfer_config())
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
def _check_bucket(uri: str) -> None:
    """One HeadBucket: the endpoint answers, the credentials are accepted, the bucket exists."""
    bucket = split_s3(uri)[0]
    try:
        with s3_errors(uri, missing="bucket"):
            s3_client().head_bucket(Bucket=bucket)
    except (S3CredentialsError, S3BucketError):
        # A HEAD answer has no body, so a refusal is a bare 403 or 404: ask once more with a GET,
        # whose answer names the reason (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied,
        # NoSuchBucket, InvalidBucketName).
        with s3_errors(uri, missing="bucket"):
            s3_client().list_objects_v2(Bucket=bucket, MaxKeys=1)
        raise


def check_writable(uri: str) -> None:
    """Fail fast, before any work starts, when ``uri`` cannot be written.

    For S3 this reaches the endpoint and the bucket; the error says which endpoint was tried and
    how to point at another one (never the credentials).
    """
    if is_s3(uri):
        _check_bucket(uri)
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
        try:
            _check_bucket(uri)
        except StorageError as e:
            endpoint = s3_endpoint() or "(AWS default)"
            reason = str(e).removeprefix(f"{uri}: ")
            for said in (f" at S3 endpoint {endpoint}", f" by S3 endpoint {endpoint}", f"S3 endpoint {endpoint} "):
                reason = reason.replace(said, "")  # named once, in front
            raise type(e)(f"{uri}: cannot read from S3 endpoint {endpoint}: {reason}") from None
    elif not Path(uri).exists():
        raise StorageError(f"{uri}: no such file or directory")


# -- local copies with a cache ------------------------------------------------------------------
# local_copy(uri) is the one way to get a local path for a model file or folder (weights, teacher
# folders, checkpoint bundles). Cache layout, one folder per URI:
#     <cache_dir>/<sha256(uri)[:16]>/files/<path relative to the URI>   the copy (what is returned)
#     <cache_dir>/<sha256(uri)[:16]>/meta/<same path>.json              {"etag", "size"} of that copy
#     <cache_dir>/<sha256(uri)[:16]>/.lock                              held while the copy is synced
# A file is kept while its recorded ETag and size match the object's; otherwise it is downloaded to a
# temporary name and renamed into place, then its meta written, so a crash never leaves a partial file
# that looks valid. Processes sharing a cache take the lock in turn (fcntl.flock), so a second
# process waits for the first and then finds everything cached.
def default_cache_dir(name: str = "s3") -> Path:
    """``$GECO_CACHE/<name>`` (``~/.cache/geco/<name>`` when unset): callers name their own corner."""
    return Path(os.environ.get("GECO_CACHE", "~/.cache/geco")).expanduser() / name


def _s3_objects(uri: str) -> dict[str, tuple[str, str, int]]:
    """{relative path: (full URI, etag, size)} for the object ``uri`` itself, else every object under
    the prefix ``uri/``; empty when there is neither."""
    if split_s3(uri)[1]:
        try:
            st = stat(uri)
            return {basename(uri): (uri, st["etag"], int(st["size"]))}
        except FileNotFoundError:
            pass
    return {u[len(uri) + 1:]: (u, st["etag"], int(st["size"])) for u, st in list_stats(uri).items()}


def local_copy(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path holding ``uri``'s content: a local path is returned as is (``~`` expanded); an
    ``s3://`` object becomes a cached file, an ``s3://`` prefix a cached folder mirroring every object
    under it (files no longer on S3 are removed from the copy). ``cache_dir`` defaults to
    :func:`default_cache_dir`. Raises FileNotFoundError when nothing is there."""
    import fcntl  # POSIX only; imported here so the rest of the module stays portable

    uri = str(uri)
    if not is_s3(uri):
        p = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{uri}: no such file or directory")
        return p
    uri = uri.rstrip("/")
    objects = _s3_objects(uri)
    if not objects:
        raise FileNotFoundError(f"{uri}: no object and nothing under this S3 prefix")
    entry = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    entry = entry / hashlib.sha256(uri.encode()).hexdigest()[:16]
    files, meta = entry / "files", entry / "meta"
    single = len(objects) == 1 and next(iter(objects.values()))[0] == uri
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for rel, (src, etag, size) in sorted(objects.items()):
            dst, rec = files / rel, meta / f"{rel}.json"
            want = {"etag": etag, "size": size}
            try:
                have = json.loads(rec.read_text())
            except (OSError, ValueError):
                have = None
            if have == want and dst.is_file() and dst.stat().st_size == size:
                continue
            rec.unlink(missing_ok=True)  # the meta is written only once the file is whole
            download(src, dst)
            rec.parent.mkdir(parents=True, exist_ok=True)
            tmp = rec.with_name(f".{rec.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps(want))
            os.replace(tmp, rec)
        if not single:  # a mirror: drop what is no longer under the prefix
            for p in [p for p in files.rglob("*") if p.is_file()]:
                rel = p.relative_to(files).as_posix()
                if rel not in objects:
                    p.unlink()
                    (meta / f"{rel}.json").unlink(missing_ok=True)
    return files / basename(uri) if single else files
