"""The test services are real servers: S3 over HTTP on loopback, reached through geco.storage."""
import pytest

from geco import storage

pytestmark = pytest.mark.s3


def test_s3_storage_roundtrip_and_atomic_commit(s3_bucket):
    uri = storage.join(s3_bucket, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.stat(uri)["size"] == 5
    assert storage.listdir(s3_bucket) == [uri]

    # A writer that fails midway leaves nothing visible.
    bad = storage.join(s3_bucket, "a", "broken.bin")
    with pytest.raises(ZeroDivisionError):
        with storage.atomic_writer(bad) as f:
            f.write(b"partial")
            raise ZeroDivisionError("killed mid-write")
    assert not storage.exists(bad)
    assert storage.listdir(s3_bucket) == [uri]


def test_local_atomic_commit(tmp_path):
    target = str(tmp_path / "x" / "out.bin")
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(target) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert storage.listdir(str(tmp_path)) == []
    storage.write_bytes(target, b"whole")
    assert storage.read_bytes(target) == b"whole"


def test_unreachable_endpoint_fails_fast_with_a_clear_error(monkeypatch):
    from tests.services import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    storage._client.cache_clear()
    try:
        with pytest.raises(storage.StorageError, match="cannot reach S3 endpoint http://127.0.0.1"):
            storage.check_writable("s3://nowhere/prefix")
    finally:
        storage._client.cache_clear()


def test_missing_bucket_is_named(s3_env):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_writable("s3://no-such-bucket/x")
