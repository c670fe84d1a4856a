"""geco.storage's S3 failures, without a server: a stalled endpoint (a socket that accepts and never
answers) ends within the configured timeouts, and botocore's errors (real ClientError objects, served
by a botocore Stubber) become the project's one-line exceptions naming the URI and the fix.

The same against the real SeaweedFS server: tests/integration/test_s3_faults.py."""
import socket
import time

import pytest
from botocore.stub import Stubber

from geco import storage


@pytest.fixture
def fresh_clients():
    storage._client.cache_clear()
    yield
    storage._client.cache_clear()


@pytest.fixture
def stalled_endpoint(monkeypatch, fresh_clients):
    """An endpoint whose TCP connections are accepted (by the kernel's backlog) but never answered,
    as a paused server's are; tight timeouts so each call gives up in about a second."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                 "AWS_DEFAULT_REGION": "us-east-1", "GECO_S3_CONNECT_TIMEOUT": "1",
                 "GECO_S3_READ_TIMEOUT": "1", "GECO_S3_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(k, v)
    yield endpoint
    sock.close()


def _assert_one_line(err: BaseException, *parts: str) -> None:
    msg = str(err)
    assert "\n" not in msg and err.__suppress_context__, msg  # botocore's chain is not printed
    for p in parts:
        assert p in msg, msg


def test_a_stalled_endpoint_is_named_within_the_configured_timeouts(stalled_endpoint, tmp_path):
    uri = "s3://bucket/a/b.bin"
    calls = {"check_writable": lambda: storage.check_writable("s3://bucket/out"),
             "exists": lambda: storage.exists(uri), "read_bytes": lambda: storage.read_bytes(uri),
             "stat": lambda: storage.stat(uri), "download": lambda: storage.download(uri, tmp_path / "b.bin"),
             "write_bytes": lambda: storage.write_bytes(uri, b"x"), "listdir": lambda: storage.listdir("s3://bucket/a"),
             "delete": lambda: storage.delete(uri)}
    for name, call in calls.items():
        t0 = time.monotonic()
        with pytest.raises(storage.S3EndpointError) as e:
            call()
        assert time.monotonic() - t0 < 10, name  # 1 s read timeout, 1 attempt (was: ~4 min, then AttributeError)
        _assert_one_line(e.value, f"S3 endpoint {stalled_endpoint} not answering (timed out after ",
                         "GECO_S3_READ_TIMEOUT")
    assert not (tmp_path / "b.bin").exists() and list(tmp_path.iterdir()) == []


def test_retries_follow_the_environment(stalled_endpoint, monkeypatch):
    monkeypatch.setenv("GECO_S3_MAX_ATTEMPTS", "2")
    t0 = time.monotonic()
    with pytest.raises(storage.S3EndpointError, match="not answering"):
        storage.stat("s3://bucket/k")
    assert time.monotonic() - t0 >= 2  # two attempts of 1 s each (the first counts)


def test_settings_come_from_the_environment_and_bad_values_name_the_variable(monkeypatch, fresh_clients):
    for var in ("GECO_S3_CONNECT_TIMEOUT", "GECO_S3_READ_TIMEOUT", "GECO_S3_MAX_ATTEMPTS"):
        monkeypatch.delenv(var, raising=False)
    assert storage.s3_settings() == storage.S3Settings(connect_timeout=5.0, read_timeout=30.0, max_attempts=3)
    monkeypatch.setenv("GECO_S3_READ_TIMEOUT", "7.5")
    monkeypatch.setenv("GECO_S3_MAX_ATTEMPTS", "4")
    config = storage.s3_client().meta.config
    assert (config.read_timeout, config.connect_timeout, config.retries["total_max_attempts"]) == (7.5, 5.0, 4)
    for var, bad in (("GECO_S3_READ_TIMEOUT", "inf"), ("GECO_S3_READ_TIMEOUT", "0"),
                     ("GECO_S3_CONNECT_TIMEOUT", "soon"), ("GECO_S3_MAX_ATTEMPTS", "0"),
                     ("GECO_S3_MAX_ATTEMPTS", "2.5")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(storage.StorageError, match=rf"^{var}='{bad}': expected "):
            storage.s3_settings()
        monkeypatch.delenv(var)


@pytest.fixture
def stubbed(monkeypatch, fresh_clients):
    """The project's S3 client with botocore's Stubber: real ClientError objects, no network."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.example:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with Stubber(storage.s3_client()) as stub:
        yield stub


@pytest.mark.parametrize("code,status,cls,says", [
    ("InvalidAccessKeyId", 403, storage.S3CredentialsError, "rejected the credentials (InvalidAccessKeyId)"),
    ("SignatureDoesNotMatch", 403, storage.S3CredentialsError, "rejected the credentials (SignatureDoesNotMatch)"),
    ("AccessDenied", 403, storage.S3CredentialsError, "access denied by S3 endpoint http://s3.example:9000"),
    ("NoSuchBucket", 404, storage.S3BucketError, "bucket 'bkt' does not exist at S3 endpoint"),
    ("InvalidBucketName", 400, storage.S3BucketError, "'bkt' is not a valid bucket name"),
    ("InternalError", 500, storage.StorageError, "answered InternalError"),
])
def test_client_errors_become_one_line_storage_errors(stubbed, code, status, cls, says):
    stubbed.add_client_error("get_object", service_error_code=code, service_message="from the server",
                             http_status_code=status)
    with pytest.raises(cls) as e:
        storage.read_bytes("s3://bkt/k.bin")
    assert type(e.value) is cls
    _assert_one_line(e.value, "s3://bkt/k.bin: ", says)
    if cls is storage.S3CredentialsError:
        assert "AWS_ACCESS_KEY_ID" in str(e.value)


def test_missing_objects_stay_file_not_found_and_a_headbucket_404_is_a_missing_bucket(stubbed):
    stubbed.add_client_error("head_object", service_error_code="404", http_status_code=404)
    assert storage.exists("s3://bkt/k") is False
    stubbed.add_client_error("get_object", service_error_code="NoSuchKey", http_status_code=404)
    with pytest.raises(FileNotFoundError, match="s3://bkt/k"):
        storage.read_bytes("s3://bkt/k")
    stubbed.add_client_error("head_bucket", service_error_code="404", http_status_code=404)
    stubbed.add_client_error("list_objects_v2", service_error_code="NoSuchBucket", http_status_code=404)
    with pytest.raises(storage.S3BucketError, match="bucket 'bkt' does not exist"):
        storage.check_writable("s3://bkt/out")
    stubbed.add_client_error("head_bucket", service_error_code="403", http_status_code=403)
    # a bare 403 from HEAD: the check asks again with a GET, whose answer names the reason
    stubbed.add_client_error("list_objects_v2", service_error_code="AccessDenied", http_status_code=403)
    with pytest.raises(storage.S3CredentialsError, match=r"^s3://bkt/in: cannot read from S3 endpoint "
                                                         r"http://s3.example:9000: access denied \(AccessDenied\)"):
        storage.check_readable("s3://bkt/in")


def test_writes_name_a_missing_bucket(stubbed):
    stubbed.add_client_error("put_object", service_error_code="NoSuchBucket", http_status_code=404)
    with pytest.raises(storage.S3BucketError) as e:
        storage.write_bytes("s3://bkt/out/k.bin", b"x")
    _assert_one_line(e.value, "s3://bkt/out/k.bin: bucket 'bkt' does not exist at S3 endpoint http://s3.example:9000")


def test_other_exceptions_pass_through_untouched(stalled_endpoint):
    with pytest.raises(ZeroDivisionError):
        with storage.s3_errors("s3://bkt/k"):
            raise ZeroDivisionError
    with pytest.raises(storage.S3BucketError, match="'no!bucket' is not a valid bucket name"):
        storage.read_bytes("s3://no!bucket/k")  # botocore refuses the name before sending anything
