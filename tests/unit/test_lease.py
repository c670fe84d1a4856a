"""geco.lease: a second acquirer is refused with the holder and the expiry; an expired lease is taken
over; renewal and release act only on our own lease; racing acquirers: exactly one wins.

Each test runs on a local folder and on a real S3 server (SeaweedFS: conditional writes)."""
from __future__ import annotations

import threading
import time

import pytest

from geco import storage
from geco.lease import Lease, LeaseHeld, LeaseLost, lease_uri


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["local", "s3"])
def dataset(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "shards")
    return request.getfixturevalue("s3_bucket") + "/shards"


def test_a_second_acquirer_is_refused_saying_who_holds_it_and_until_when(dataset):
    clock = Clock()
    uri = lease_uri(dataset, "retrain")
    assert uri == storage.join(dataset, "leases", "retrain.json")
    first = Lease(uri, ttl_s=600, holder="alice@node-1 pid 7 (geco retrain)", clock=clock)
    info = first.acquire()
    assert info.expires_at == clock.t + 600
    second = Lease(uri, ttl_s=600, holder="bob@node-2 pid 9 (geco retrain)", clock=clock)
    with pytest.raises(LeaseHeld) as err:
        second.acquire()
    message = str(err.value)
    assert "held by alice@node-1 pid 7 (geco retrain) until 2027-01-15 08:10:00 UTC" in message, message
    assert "\n" not in message and uri in message
    assert err.value.info.token == first.token
    assert second.read().holder == first.holder
    assert second.release() is False  # never held: nothing removed
    assert storage.exists(uri)
    assert first.release() is True
    assert not storage.exists(uri)
    assert second.acquire().holder.startswith("bob@")  # free again


def test_an_expired_lease_is_taken_over_and_its_old_holder_finds_it_lost(dataset):
    clock = Clock()
    uri = lease_uri(dataset)
    dead = Lease(uri, ttl_s=60, holder="dead", clock=clock)
    dead.acquire()
    clock.t += 59
    with pytest.raises(LeaseHeld):
        Lease(uri, ttl_s=60, holder="early", clock=clock).acquire()
    clock.t += 1  # expired now
    late = Lease(uri, ttl_s=60, holder="late", clock=clock)
    assert late.acquire().holder == "late"
    assert late.read().token == late.token
    with pytest.raises(LeaseLost, match=r"our lease \(dead\) was lost: now held by late until"):
        dead.renew()
    assert dead.release() is False  # lost: the new holder's lease stays
    assert late.read().holder == "late"
    clock.t += 30
    assert late.renew().expires_at == clock.t + 60
    assert late.release() is True


def test_racing_acquirers_one_wins(dataset):
    uri = lease_uri(dataset)
    leases = [Lease(uri, ttl_s=600, holder=f"racer-{i}") for i in range(6)]
    won, refused = [], []
    start = threading.Barrier(len(leases))

    def go(lease: Lease) -> None:
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld:
            refused.append(lease)

    threads = [threading.Thread(target=go, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and len(refused) == len(leases) - 1, (won, refused)
    assert Lease(uri).read().token == won[0].token


def test_with_block_renews_in_the_background_and_releases(dataset):
    uri = lease_uri(dataset)
    lease = Lease(uri, ttl_s=0.6, holder="long run")
    with lease as info:
        time.sleep(1.5)  # past two expiries without renewal
        stored = lease.read()
        assert stored.token == lease.token and stored.expires_at > info.expires_at
        with pytest.raises(LeaseHeld):
            Lease(uri, ttl_s=0.6, holder="overlapping").acquire()
    assert lease.lost is None
    lease.check()  # still ours to the end
    assert Lease(uri).read() is None


def test_a_run_whose_lease_was_taken_over_finds_out_before_it_commits(dataset):
    uri = lease_uri(dataset)
    clock = Clock()
    slow = Lease(uri, ttl_s=10, holder="slow", clock=clock)
    with slow:
        clock.t += 11  # it missed its renewals: expired
        Lease(uri, ttl_s=10, holder="next", clock=clock).acquire()
        slow.ttl_s = 0.3  # the next background renewal comes at once
        deadline = time.monotonic() + 10
        while slow.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseLost, match="now held by next"):
            slow.check()
    assert Lease(uri).read().holder == "next"  # leaving the block did not remove the new holder's lease
