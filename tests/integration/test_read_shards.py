"""pipelines.data on a real local Ray: the current samples of a split, superseded copies of
re-rendered objects dropped, and key filters evaluated in Arrow."""
from geco.data.shards import ShardWriter, committed_state, write_manifest_version


def _write(out: str, keys: list[str], split: str = "train", tag: bytes = b"v1") -> None:
    with ShardWriter(out, len(keys), start_index=committed_state(out)["next_index"]) as w:
        for k in keys:
            w.add({"__key__": k, "cond.png": tag + k.encode()}, f"{k}-{tag.decode()}", split)


def test_read_shards_drops_superseded_copies_and_filters_keys(tmp_path, ray_local):
    from pipelines.data import filter_keys, read_shards

    out = str(tmp_path / "shards")
    _write(out, ["a", "b", "c"])
    _write(out, ["v"], split="val")
    write_manifest_version(out, settings_hash="s", source_list_hash="l")
    rows = read_shards(out, "train").take_all()
    assert sorted(r["__key__"] for r in rows) == ["a", "b", "c"]
    assert [r["__key__"] for r in read_shards(out, "val").take_all()] == ["v"]

    _write(out, ["b"], tag=b"v2")  # "b" re-rendered: the copy in the first shard is superseded
    write_manifest_version(out, settings_hash="s", source_list_hash="l")
    rows = {r["__key__"]: r["cond.png"] for r in read_shards(out, "train").take_all()}
    assert rows == {"a": b"v1a", "b": b"v2b", "c": b"v1c"}

    ds = read_shards(out, "train")
    assert sorted(r["__key__"] for r in filter_keys(ds, {"a", "c"}).take_all()) == ["a", "c"]
    assert [r["__key__"] for r in filter_keys(ds, {"a", "c"}, keep=False).take_all()] == ["b"]
