"""S3 faults against the real SeaweedFS server: a paused server, a server lost mid-work, wrong
credentials and wrong buckets each end in one line naming the URI and the fix (geco.storage's
StorageError subclasses), within the configured timeouts."""
import os
import signal
import socket
import time
import uuid

import pytest

from geco import storage
from geco.data import shards
from tests.services import SeaweedS3

pytestmark = pytest.mark.s3


def _assert_one_line(err: BaseException, *parts: str) -> None:
    msg = str(err)
    assert "\n" not in msg and err.__suppress_context__, msg  # botocore's chain is not printed
    assert "geco-test-secret" not in msg and "Traceback" not in msg, msg
    for p in parts:
        assert p in msg, msg


@pytest.fixture
def paused(s3_server, monkeypatch):
    """Tight timeouts (1 s, 2 attempts) for this test's S3 clients, and a function that SIGSTOPs the
    server's processes (up, connections accepted, nothing answered); SIGCONT after the test."""
    for k, v in {"GECO_S3_CONNECT_TIMEOUT": "1", "GECO_S3_READ_TIMEOUT": "1", "GECO_S3_MAX_ATTEMPTS": "2"}.items():
        monkeypatch.setenv(k, v)
    storage._client.cache_clear()
    yield lambda: os.killpg(s3_server.proc.pid, signal.SIGSTOP)
    os.killpg(s3_server.proc.pid, signal.SIGCONT)
    storage._client.cache_clear()


def _put(s3_server, uri: str, data: bytes) -> None:
    """Written with the server's own client: the tight timeouts are for the reads under test."""
    bucket, key = storage.split_s3(uri)
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=data)


def test_a_paused_server_is_named_within_the_configured_timeouts(s3_server, s3_bucket, paused, tmp_path):
    uri = storage.join(s3_bucket, "k.bin")
    _put(s3_server, uri, b"hello")
    paused()
    calls = {"check_writable": lambda: storage.check_writable(storage.join(s3_bucket, "out")),
             "exists": lambda: storage.exists(uri), "read_bytes": lambda: storage.read_bytes(uri),
             "stat": lambda: storage.stat(uri), "download": lambda: storage.download(uri, tmp_path / "k.bin"),
             "write_bytes": lambda: storage.write_bytes(uri, b"new")}
    for name, call in calls.items():
        t0 = time.monotonic()
        with pytest.raises(storage.S3EndpointError) as e:
            call()
        # 2 attempts of 1 s plus botocore's backoff (was: ~4 min, then AttributeError)
        assert time.monotonic() - t0 < 15, name
        _assert_one_line(e.value, f"S3 endpoint {s3_server.endpoint} not answering "
                                  "(timed out after ", uri.rsplit("/", 1)[0], "GECO_S3_READ_TIMEOUT")
    assert not (tmp_path / "k.bin").exists()


def test_a_server_paused_mid_stream_is_named(s3_server, s3_bucket, paused):
    uri = storage.join(s3_bucket, "big.bin")
    _put(s3_server, uri, os.urandom(32 << 20))  # more than the socket buffers hold
    with storage.open_read(uri) as f:
        assert len(f.read(1 << 20)) == 1 << 20
        paused()
        with pytest.raises(storage.S3EndpointError) as e:
            while f.read(1 << 20):
                pass
    _assert_one_line(e.value, uri)


@pytest.fixture
def lost_server(tmp_path, monkeypatch):
    """A server of this test's own, to be lost: the standard AWS variables point at it."""
    server = SeaweedS3(tmp_path / "seaweedfs").start()
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GECO_S3_MAX_ATTEMPTS", "2")
    storage._client.cache_clear()
    yield server
    server.stop()
    storage._client.cache_clear()


def test_a_server_lost_mid_write_is_one_line(lost_server):
    out = lost_server.create_bucket("shards") + "/run"
    writer = shards.ShardWriter(out, samples_per_shard=1)
    writer.add({"__key__": "obj-0", "cond.png": b"png"}, "hash-0")  # committed: the server is there
    assert len(writer.committed) == 1
    lost_server.stop()
    with pytest.raises(storage.S3EndpointError) as e:
        writer.add({"__key__": "obj-1", "cond.png": b"png"}, "hash-1")
    _assert_one_line(e.value, f"{out}/", f"cannot reach S3 endpoint {lost_server.endpoint}",
                     "AWS_ENDPOINT_URL")
    assert isinstance(e.value, storage.StorageError)  # the CLI prints StorageErrors as one line, exit 2
    for call in (lambda: storage.read_bytes(f"{out}/x"), lambda: storage.listdir(out)):
        with pytest.raises(storage.S3EndpointError, match="cannot reach S3 endpoint"):
            call()
    with pytest.raises(storage.S3EndpointError, match=f"^{out}: cannot read from S3 endpoint "
                                                      f"{lost_server.endpoint}: cannot reach "):
        storage.check_readable(out)


@pytest.mark.parametrize("key,secret,code", [("geco-test", "wrong-secret", "SignatureDoesNotMatch"),
                                             ("nobody", "whatever", "InvalidAccessKeyId")])
def test_wrong_credentials_are_named_not_reported_as_unreachable(s3_bucket, monkeypatch, key, secret, code):
    uri = storage.join(s3_bucket, "k.bin")
    storage.write_bytes(uri, b"hello")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage._client.cache_clear()
    for call in (lambda: storage.check_writable(uri), lambda: storage.check_readable(uri),
                 lambda: storage.read_bytes(uri), lambda: storage.write_bytes(uri, b"x"),
                 lambda: storage.listdir(s3_bucket)):
        with pytest.raises(storage.S3CredentialsError) as e:
            call()
        _assert_one_line(e.value, f"rejected the credentials ({code})", "AWS_ACCESS_KEY_ID")
        assert "cannot reach" not in str(e.value)
    with pytest.raises(storage.S3CredentialsError, match=r"access denied by S3 endpoint .* \(403\)"):
        storage.exists(uri)  # HEAD: a bare 403, no reason given


def test_wrong_buckets_are_named(s3_env):
    """(SeaweedFS creates a missing bucket on PUT, so writes are covered in tests/unit/test_storage.py.)"""
    missing = f"s3://no-such-{uuid.uuid4().hex[:8]}/data"
    for call in (lambda: storage.check_writable(missing), lambda: storage.read_bytes(f"{missing}/k"),
                 lambda: storage.listdir(missing)):
        with pytest.raises(storage.S3BucketError) as e:
            call()
        _assert_one_line(e.value, f"bucket {missing[5:].split('/')[0]!r} does not exist at S3 endpoint")
    with pytest.raises(storage.S3BucketError, match="cannot read from S3 endpoint .*does not exist"):
        storage.check_readable(missing)
    # A name S3 refuses: SeaweedFS answers NoSuchBucket (AWS: InvalidBucketName, covered with a
    # Stubber in tests/unit/test_storage.py); either way the bucket is named.
    with pytest.raises(storage.S3BucketError, match="^s3://ab/out: bucket 'ab' "):
        storage.check_writable("s3://ab/out")


@pytest.mark.blender
@pytest.mark.slow
def test_s3_lost_mid_render_ends_in_one_line(lost_server, ray_local, tmp_path):
    """The render stage writing shards to S3 when the server goes away after the first shard: a
    StorageError of one line (the CLI prints it as such, exit 2), not pages of botocore."""
    import threading

    from geco.config import load_config
    from pipelines import render

    out = lost_server.create_bucket("render") + "/shards"
    cfg = load_config(None, [
        "source.kind=procedural", "source.num_procedural=8", f"dataset.uri={out}",
        "render.cond.resolution=32", "render.zero123.resolution=32", "models.teacher.tile_size=32", "render.random.count=1",
        "render.random.resolution=32", "render.blender.samples=2", "render.blender.threads=1",
        "dataset.samples_per_shard=1", "dataset.val_fraction=0.0", "ray.num_renderers=1",
        "ray.cpus_per_renderer=0.5", f"cache.dir={tmp_path / 'cache'}", "cache.max_gb=1",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    client = lost_server.client()

    def lose_the_server_after_the_first_shard():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            listed = client.list_objects_v2(Bucket="render").get("Contents", [])
            if any(o["Key"].endswith(".tar") for o in listed):
                lost_server.stop()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=lose_the_server_after_the_first_shard, daemon=True)
    watcher.start()
    with pytest.raises(storage.S3EndpointError) as e:
        render.run(cfg)
    watcher.join(timeout=5)
    _assert_one_line(e.value, f"{out}/", f"cannot reach S3 endpoint {lost_server.endpoint}", "AWS_ENDPOINT_URL")

    # the server back (same address, same data): the re-run completes the dataset, nothing lost or twice
    lost_server.start()
    storage._client.cache_clear()
    again = render.run(cfg)
    assert again.rendered + again.skipped == 8 and again.failed == 0, again.summary()
    _assert_each_object_once(out, 8)


def _assert_each_object_once(out: str, n: int) -> None:
    """The latest manifest lists each of the ``n`` objects exactly once, and every shard on S3 is
    complete (has its index): nothing half-written visible."""
    manifest = shards.read_latest_manifest(out)
    keys = [s["key"] for shard in manifest["shards"] for s in shard["samples"]]
    assert sorted(keys) == [f"procedural-{i:04d}" for i in range(n)], keys
    state = shards.committed_state(out)
    assert state["orphans"] == [] and len(state["shards"]) == len(manifest["shards"])


@pytest.mark.blender
@pytest.mark.slow
def test_a_short_s3_outage_mid_render_is_retried(lost_server, ray_local, tmp_path, monkeypatch):
    """The server gone for a few seconds while shards are written: botocore's retries with backoff
    (GECO_S3_MAX_ATTEMPTS) carry the writes over the gap and the render completes."""
    import threading

    from geco.config import load_config
    from pipelines import render

    monkeypatch.setenv("GECO_S3_MAX_ATTEMPTS", "10")  # backoff up to ~20 s between tries: > the outage
    storage._client.cache_clear()
    out = lost_server.create_bucket("render") + "/shards"
    cfg = load_config(None, [
        "source.kind=procedural", "source.num_procedural=6", f"dataset.uri={out}",
        "render.cond.resolution=32", "render.zero123.resolution=32", "models.teacher.tile_size=32", "render.random.count=1",
        "render.random.resolution=32", "render.blender.samples=2", "render.blender.threads=1",
        "dataset.samples_per_shard=1", "dataset.val_fraction=0.0", "ray.num_renderers=1",
        "ray.cpus_per_renderer=0.5", f"cache.dir={tmp_path / 'cache'}", "cache.max_gb=1", "tracking.enabled=false"])
    client = lost_server.client()
    outage: dict = {}

    def a_short_outage_after_the_first_shard():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            listed = client.list_objects_v2(Bucket="render").get("Contents", [])
            if any(o["Key"].endswith(".tar") for o in listed):
                outage["shards_before"] = sum(o["Key"].endswith(".tar") for o in listed)
                lost_server.stop()
                time.sleep(3)
                lost_server.start()  # same ports, same data
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=a_short_outage_after_the_first_shard, daemon=True)
    watcher.start()
    res = render.run(cfg)
    watcher.join(timeout=30)
    assert 1 <= outage["shards_before"] < 6, outage  # the outage fell inside the render
    assert res.rendered == 6 and res.failed == 0, res.summary()
    _assert_each_object_once(out, 6)


def test_the_pyarrow_filesystem_follows_the_same_timeouts(monkeypatch):
    """Ray Data/Train's S3 filesystem (pipelines/cluster.py) gives up on a stalled endpoint (a socket
    that accepts and never answers) after GECO_S3_READ_TIMEOUT too (curl's low-speed limit on Linux)."""
    from pipelines.cluster import s3_filesystem

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{sock.getsockname()[1]}", "AWS_ACCESS_KEY_ID": "x",
                     "AWS_SECRET_ACCESS_KEY": "y", "GECO_S3_CONNECT_TIMEOUT": "1", "GECO_S3_READ_TIMEOUT": "2",
                     "GECO_S3_MAX_ATTEMPTS": "1"}.items():
            monkeypatch.setenv(k, v)
        t0 = time.monotonic()
        with pytest.raises(OSError, match="Timeout was reached"):
            s3_filesystem().get_file_info("bucket/key")
        assert time.monotonic() - t0 < 10  # pyarrow's default: 3 attempts of ~3 s
