"""Object sources, procedural objects and the per-node object cache."""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geco.config import SourceConfig
from geco.data import procedural
from geco.data.cache import ObjectCache, entry_key
from geco.data.procedural import (
    make_procedural_glb,
    make_procedural_object,
    procedural_mesh,
)
from geco.sources import (
    GSO_LICENSE,
    ObjectRef,
    SourceError,
    UnsafePath,
    fetch,
    list_objects,
    objaverse_base,
    parse_mtl_textures,
    parse_procedural_uri,
    read_uid_list,
    source_list_hash,
)
from tests.fake_objaverse import write_fake_objaverse_cache


# ---------------------------------------------------------------------------------------------
# helpers: read our own files back
# ---------------------------------------------------------------------------------------------
def parse_glb(data: bytes) -> tuple[dict, bytes]:
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and length == len(data)
    jlen, jtype = struct.unpack_from("<II", data, 12)
    assert jtype == 0x4E4F534A and jlen % 4 == 0
    doc = json.loads(data[20:20 + jlen])
    blen, btype = struct.unpack_from("<II", data, 20 + jlen)
    assert btype == 0x004E4942 and blen % 4 == 0
    binary = data[28 + jlen:28 + jlen + blen]
    assert 28 + jlen + blen == length
    return doc, binary


def glb_arrays(doc: dict, binary: bytes) -> dict[str, np.ndarray]:
    dtypes = {5126: "<f4", 5123: "<u2", 5125: "<u4"}
    sizes = {"SCALAR": 1, "VEC2": 2, "VEC3": 3}
    assert doc["buffers"][0]["byteLength"] == len(binary)
    out = {}
    prim = doc["meshes"][0]["primitives"][0]
    named = {**{k: v for k, v in prim["attributes"].items()}, "indices": prim["indices"]}
    for name, idx in named.items():
        acc = doc["accessors"][idx]
        view = doc["bufferViews"][acc["bufferView"]]
        assert view["byteOffset"] % 4 == 0
        assert view["byteOffset"] + view["byteLength"] <= len(binary)
        n = acc["count"] * sizes[acc["type"]]
        arr = np.frombuffer(binary, dtypes[acc["componentType"]], n, view["byteOffset"] + acc.get("byteOffset", 0))
        out[name] = arr.reshape(acc["count"], -1) if sizes[acc["type"]] > 1 else arr
    return out


def parse_obj(path: Path) -> dict:
    counts = {"v": [], "vt": [], "vn": [], "f": [], "mtllib": [], "usemtl": []}
    for line in path.read_text().splitlines():
        tag, _, rest = line.partition(" ")
        if tag in counts:
            counts[tag].append(rest)
    return counts


# ---------------------------------------------------------------------------------------------
# procedural objects
# ---------------------------------------------------------------------------------------------
def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_procedural_is_deterministic(tmp_path):
    for i in range(5):
        make_procedural_object(i, 3, tmp_path / "a")
        make_procedural_glb(i, 3, tmp_path / "a")
        make_procedural_object(i, 3, tmp_path / "b")
        make_procedural_glb(i, 3, tmp_path / "b")
        make_procedural_glb(i, 4, tmp_path / "c")
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b and len(a) == 20  # 5 x (obj, mtl, png, glb), byte for byte
    assert all(a[k] != c[k] for k in c)  # another seed, other objects
    assert not list((tmp_path / "a").glob(".*"))  # no temporary files left


def test_procedural_shapes_are_small_centred_and_varied():
    shapes, textures = set(), []
    for i in range(10):
        mesh, tex = procedural_mesh(i, 0)
        shapes.add(procedural.shape_of(i))
        assert len(mesh.faces) < 5000 and mesh.faces.max() < len(mesh.positions)
        lo, hi = mesh.positions.min(0), mesh.positions.max(0)
        np.testing.assert_allclose((lo + hi) / 2, 0, atol=1e-5)
        assert abs((hi - lo).max() - 1.0) < 1e-5  # fits [-0.5, 0.5]^3, largest side 1
        np.testing.assert_allclose(np.linalg.norm(mesh.normals, axis=1), 1, atol=1e-4)
        # winding agrees with the normals: triangles face outward
        tri = mesh.positions[mesh.faces]
        geo = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        assert ((geo * mesh.normals[mesh.faces].sum(1)).sum(1) > 0).all()
        assert tex.shape == (128, 128, 3) and tex.std() > 10  # a visible pattern
        textures.append(tex.tobytes())
    assert shapes == set(procedural.SHAPES)
    assert len(set(textures)) == 10


def test_procedural_obj_is_well_formed(tmp_path):
    obj = make_procedural_object(2, 0, tmp_path)
    assert obj.name == "procedural-0002.obj"
    parsed = parse_obj(obj)
    nv = len(parsed["v"])
    assert nv == len(parsed["vt"]) == len(parsed["vn"]) > 0
    for face in parsed["f"]:
        idx = [int(x) for corner in face.split() for x in corner.split("/")]
        assert len(idx) == 9 and 1 <= min(idx) and max(idx) <= nv
    assert parsed["mtllib"] == ["procedural-0002.mtl"] and parsed["usemtl"] == ["material_0"]
    mtl = (tmp_path / "procedural-0002.mtl").read_text()
    assert parse_mtl_textures(mtl) == ["procedural-0002.png"]
    img = Image.open(tmp_path / "procedural-0002.png")
    img.load()
    assert img.size == (128, 128) and img.mode == "RGB"


def test_procedural_glb_is_well_formed_and_matches_the_obj(tmp_path):
    for i in range(5):
        data = make_procedural_glb(i, 1, tmp_path).read_bytes()
        doc, binary = parse_glb(data)
        assert doc["asset"]["version"] == "2.0"
        arrays = glb_arrays(doc, binary)
        n = len(arrays["POSITION"])
        assert len(arrays["NORMAL"]) == len(arrays["TEXCOORD_0"]) == n
        assert len(arrays["indices"]) % 3 == 0 and arrays["indices"].max() < n
        acc = doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
        np.testing.assert_allclose(acc["min"], arrays["POSITION"].min(0))
        np.testing.assert_allclose(acc["max"], arrays["POSITION"].max(0))
        mat = doc["materials"][doc["meshes"][0]["primitives"][0]["material"]]
        tex = doc["textures"][mat["pbrMetallicRoughness"]["baseColorTexture"]["index"]]
        image = doc["images"][tex["source"]]
        view = doc["bufferViews"][image["bufferView"]]
        png = binary[view["byteOffset"]:view["byteOffset"] + view["byteLength"]]
        assert image["mimeType"] == "image/png" and Image.open(io.BytesIO(png)).size == (128, 128)
        # same geometry as the .obj (both y up on disk), glTF v flipped
        mesh, _ = procedural_mesh(i, 1)
        obj = parse_obj(make_procedural_object(i, 1, tmp_path))
        v = np.array([[float(x) for x in s.split()] for s in obj["v"]])
        vt = np.array([[float(x) for x in s.split()] for s in obj["vt"]])
        np.testing.assert_allclose(v, arrays["POSITION"], atol=1e-5)
        np.testing.assert_allclose(vt[:, 1], 1 - arrays["TEXCOORD_0"][:, 1], atol=1e-5)
        np.testing.assert_array_equal(arrays["indices"].reshape(-1, 3), mesh.faces)
        np.testing.assert_allclose(arrays["POSITION"][:, 1], mesh.positions[:, 2], atol=1e-6)  # z up -> y up


# ---------------------------------------------------------------------------------------------
# dir source
# ---------------------------------------------------------------------------------------------
def make_mixed_folder(root: Path) -> Path:
    """glb, obj+mtl+texture in a subfolder, obj with a missing texture, .fbx, zero-byte glb, junk."""
    root.mkdir(parents=True, exist_ok=True)
    make_procedural_glb(0, 0, root)  # procedural-0000.glb
    make_procedural_object(1, 0, root / "sub")  # sub/procedural-0001.{obj,mtl,png}
    broken = root / "broken"
    make_procedural_object(2, 0, broken)
    (broken / "procedural-0002.png").unlink()  # the .mtl now points at nothing
    (root / "chair.fbx").write_bytes(b"Kaydara FBX Binary  \x00")
    (root / "empty.glb").write_bytes(b"")
    (root / "README.txt").write_text("not an object")
    (root / ".DS_Store").write_bytes(b"\x00")
    return root


def test_dir_source_lists_objects_sidecars_and_rejects(tmp_path):
    root = make_mixed_folder(tmp_path / "objs")
    listing = list_objects(SourceConfig(kind="dir", uri=str(root)))
    by_id = {r.object_id: r for r in listing.objects}
    assert list(by_id) == ["broken-procedural-0002", "empty", "procedural-0000", "sub-procedural-0001"]
    glb, sub, broken, empty = (by_id[k] for k in ("procedural-0000", "sub-procedural-0001",
                                                   "broken-procedural-0002", "empty"))
    assert glb.uri == str(root / "procedural-0000.glb") and glb.sidecars == () and glb.source_kind == "dir"
    assert sub.sidecars == (str(root / "sub/procedural-0001.mtl"), str(root / "sub/procedural-0001.png"))
    assert sub.warnings() == [] and sub.license is None
    assert broken.sidecars == (str(root / "broken/procedural-0002.mtl"),)
    assert broken.extra["missing_textures"] == ["procedural-0002.png"]
    assert broken.warnings() == ["missing texture 'procedural-0002.png'"]
    assert empty.content_hash and empty.uri.endswith("empty.glb")  # listed: the renderer records why
    # the .fbx is reported, with a reason the failures table can carry; junk is ignored
    assert [(r.uri, r.reason) for r in listing.rejected] == [
        (str(root / "chair.fbx"), "unsupported extension .fbx: supported are .glb .gltf .obj")]
    assert listing.rejected[0].object_id.startswith("chair_fbx")
    assert listing.excluded == []
    assert json.loads(json.dumps(sub.to_dict())) == sub.to_dict()
    assert ObjectRef.from_dict(sub.to_dict()) == sub == ObjectRef.from_json(sub.to_json())
    objects, rejected, excluded = listing  # unpacks in this order
    assert (objects, rejected, excluded) == (listing.objects, listing.rejected, listing.excluded)


def test_dir_hashes_change_with_bytes_and_only_then(tmp_path):
    root = make_mixed_folder(tmp_path / "objs")
    cfg = SourceConfig(kind="dir", uri=str(root))

    def hashes():
        return {r.object_id: r.content_hash for r in list_objects(cfg).objects}

    before = hashes()
    tex = root / "sub/procedural-0001.png"
    data = tex.read_bytes()
    tex.write_bytes(data)  # same bytes, new mtime
    os.utime(tex, (1, 1))
    assert hashes() == before
    tex.write_bytes(data[:-4] + b"\x00\x00\x00\x00")  # a texture changed: only its object changes
    after = hashes()
    assert after["sub-procedural-0001"] != before["sub-procedural-0001"]
    assert {k: v for k, v in after.items() if k != "sub-procedural-0001"} == \
        {k: v for k, v in before.items() if k != "sub-procedural-0001"}
    refs = list_objects(cfg).objects
    assert source_list_hash(refs) == source_list_hash(refs[::-1])
    assert source_list_hash(refs) != source_list_hash(refs[:-1])


def test_dir_limit_duplicates_and_missing_folder(tmp_path):
    root = tmp_path / "objs"
    for i in range(4):
        make_procedural_glb(i, 0, root)
    make_procedural_object(0, 0, root)  # procedural-0000.obj: same id as the .glb
    listing = list_objects(SourceConfig(kind="dir", uri=str(root), limit=2))
    assert [r.object_id for r in listing.objects] == ["procedural-0000", "procedural-0001"]
    assert listing.objects[0].uri.endswith(".glb")  # .glb sorts first and keeps the id
    (dup,) = listing.rejected
    assert dup.uri.endswith("procedural-0000.obj") and "duplicate object id 'procedural-0000'" in dup.reason
    assert dup.object_id != "procedural-0000"
    with pytest.raises(SourceError, match="not a directory"):
        list_objects(SourceConfig(kind="dir", uri=str(tmp_path / "nope")))


def test_gltf_sidecars_and_mtl_options(tmp_path):
    root = tmp_path / "objs"
    (root / "tex").mkdir(parents=True)
    (root / "scene.bin").write_bytes(b"\x00" * 8)
    (root / "tex/my image.png").write_bytes(b"png")
    doc = {"asset": {"version": "2.0"}, "buffers": [{"uri": "scene.bin", "byteLength": 8}],
           "images": [{"uri": "tex/my%20image.png"}, {"uri": "gone.jpg"}, {"uri": "data:image/png;base64,AA=="}]}
    (root / "scene.gltf").write_text(json.dumps(doc))
    (ref,) = list_objects(SourceConfig(kind="dir", uri=str(root))).objects
    assert ref.sidecars == (str(root / "scene.bin"), str(root / "tex/my image.png"))
    assert ref.extra["missing_textures"] == ["gone.jpg"]
    mtl = "newmtl a\nmap_Kd -s 1 1 1 -clamp on textures\\wood grain.png\nbump -bm 0.5 n.png\nmap_Kd x.png\n"
    assert parse_mtl_textures(mtl) == ["textures\\wood grain.png", "n.png", "x.png"]


# ---------------------------------------------------------------------------------------------
# GSO
# ---------------------------------------------------------------------------------------------
def make_gso(root: Path, name: str, index: int) -> None:
    """The GSO layout: meshes/model.obj + model.mtl saying `map_Kd texture.png`, while the texture
    lies in materials/textures/texture.png."""
    meshes = root / name / "meshes"
    obj = make_procedural_object(index, 0, meshes)
    obj.rename(meshes / "model.obj")
    text = (meshes / "model.obj").read_text().replace(f"mtllib {obj.stem}.mtl", "mtllib model.mtl")
    (meshes / "model.obj").write_text(text)
    mtl = (meshes / f"{obj.stem}.mtl").read_text().replace(f"{obj.stem}.png", "texture.png")
    (meshes / "model.mtl").write_text(mtl)
    (meshes / f"{obj.stem}.mtl").unlink()
    (root / name / "materials/textures").mkdir(parents=True)
    (meshes / f"{obj.stem}.png").rename(root / name / "materials/textures/texture.png")
    (root / name / "model.sdf").write_text("<sdf/>")


def test_gso_layout_and_texture_alias(tmp_path):
    root = tmp_path / "gso"
    make_gso(root, "Squirrel", 0)
    make_gso(root, "Rubber_Duck", 3)
    (root / "Empty_Thing" / "thumbnails").mkdir(parents=True)
    (root / "Empty_Thing" / "thumbnails" / "0.jpg").write_bytes(b"jpg")
    (root / "Boot.zip").write_bytes(b"PK")
    listing = list_objects(SourceConfig(kind="gso", uri=str(root), exclude_licenses=["by-nc"]))
    assert [r.object_id for r in listing.objects] == ["gso-Rubber_Duck", "gso-Squirrel"]
    ref = listing.objects[1]
    assert ref.license == GSO_LICENSE and ref.source_kind == "gso" and ref.extra["name"] == "Squirrel"
    texture = str(root / "Squirrel/materials/textures/texture.png")
    assert ref.sidecars == (str(root / "Squirrel/meshes/model.mtl"), texture)
    assert ref.extra["aliases"] == {"texture.png": texture} and "missing_textures" not in ref.extra
    assert sorted((r.object_id, r.reason.split(":")[0]) for r in listing.rejected) == [
        ("gso-Boot", "GSO archive not extracted"), ("gso-Empty_Thing", "GSO layout")]
    # excluding GSO's own licence excludes everything
    assert len(list_objects(SourceConfig(kind="gso", uri=str(root), exclude_licenses=["cc-by-4.0"])).excluded) == 2

    # the cache lays it out so the .mtl finds texture.png beside the mesh, without copying
    cache = ObjectCache(tmp_path / "cache", max_gb=1)
    path = fetch(ref, cache)
    assert path.name == "model.obj" and path.is_symlink() and path.read_bytes() == \
        (root / "Squirrel/meshes/model.obj").read_bytes()
    assert (path.parent / "model.mtl").exists()
    assert (path.parent / "texture.png").read_bytes() == Path(texture).read_bytes()
    assert cache.total_bytes() < 4096  # links only


# ---------------------------------------------------------------------------------------------
# objaverse
# ---------------------------------------------------------------------------------------------
UIDS = ["a" * 32, "b" * 32, "c" * 32, "d" * 32]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(url, *a, **k):
        raise OSError(f"network access in a test: {url}")

    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def fake_objaverse(tmp_path, no_network):
    base = tmp_path / "objaverse"
    glb = make_procedural_glb(0, 0, tmp_path / "glb").read_bytes()
    write_fake_objaverse_cache(base, {
        UIDS[0]: (glb, {"license": "by", "name": "Chair"}),
        UIDS[1]: (glb, {"license": "by-nc", "name": "Table"}),
        UIDS[2]: (glb, {"license": "cc0"}),
        UIDS[3]: (None, {"license": "by"}),  # known but not downloaded yet
    })
    uid_file = tmp_path / "uids.txt"
    uid_file.write_text(f"# LVIS subset\n{UIDS[1]}\n\n{UIDS[0]}.glb\n{UIDS[0]}  # again\n{UIDS[2]}\n{UIDS[3]}\n"
                        "not-a-uid\n")
    return base, uid_file, glb


def test_objaverse_resolves_from_the_package_cache_without_network(fake_objaverse, tmp_path):
    base, uid_file, glb = fake_objaverse
    assert read_uid_list(str(uid_file)) == [UIDS[1], UIDS[0], UIDS[2], UIDS[3], "not-a-uid"]
    cfg = SourceConfig(kind="objaverse", uri=str(uid_file), objaverse_cache=str(base), exclude_licenses=["BY-NC"])
    listing = list_objects(cfg)
    assert [(r.object_id, r.license) for r in listing.objects] == [(UIDS[0], "by"), (UIDS[2], "cc0"), (UIDS[3], "by")]
    assert [(r.object_id, r.license, r.reason) for r in listing.excluded] == [
        (UIDS[1], "by-nc", "licence 'by-nc' is in exclude_licenses")]
    assert [r.object_id for r in listing.rejected] == ["not-a-uid"]
    chair = listing.objects[0]
    assert chair.uri == f"https://huggingface.co/datasets/allenai/objaverse/resolve/main/glbs/000-000/{UIDS[0]}.glb"
    assert chair.extra["name"] == "Chair" and chair.content_hash
    path = fetch(chair, ObjectCache(tmp_path / "cache"))
    assert path == base / "hf-objaverse-v1/glbs/000-000" / f"{UIDS[0]}.glb" and path.read_bytes() == glb
    # the module's global cache path is restored after use
    import objaverse

    assert objaverse._VERSIONED_PATH == os.path.join(os.path.expanduser("~"), ".objaverse", "hf-objaverse-v1")
    with objaverse_base(str(base)) as ov:
        assert ov._VERSIONED_PATH == str(base / "hf-objaverse-v1")
    # limit applies after the licence filter, in id order
    assert [r.object_id for r in list_objects(cfg.model_copy(update={"limit": 1})).objects] == [UIDS[0]]


def test_objaverse_downloads_through_the_package_when_not_cached(fake_objaverse, tmp_path, monkeypatch):
    base, uid_file, glb = fake_objaverse
    listing = list_objects(SourceConfig(kind="objaverse", uri=str(uid_file), objaverse_cache=str(base)))
    ref = next(r for r in listing.objects if r.object_id == UIDS[3])
    with pytest.raises(SourceError, match="huggingface.co or a pre-filled cache"):
        fetch(ref, ObjectCache(tmp_path / "cache"))
    urls = []

    def fake_download(url, dest):  # what urllib would do: write the file at the package's tmp name
        urls.append((url, dest))
        Path(dest).write_bytes(glb)

    monkeypatch.setattr(urllib.request, "urlretrieve", fake_download)
    path = fetch(ref, ObjectCache(tmp_path / "cache"))
    assert urls == [(ref.uri, str(path) + ".tmp")] and path.read_bytes() == glb
    fetch(ref, ObjectCache(tmp_path / "cache"))
    assert len(urls) == 1  # cached now


def test_objaverse_missing_index_is_a_clear_error(tmp_path, no_network):
    (tmp_path / "uids.txt").write_text("a" * 32 + "\n")
    cfg = SourceConfig(kind="objaverse", uri=str(tmp_path / "uids.txt"), objaverse_cache=str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="object-paths.json.gz"):
        list_objects(cfg)
    with pytest.raises(SourceError, match="UID list not found"):
        list_objects(cfg.model_copy(update={"uri": str(tmp_path / "missing.txt")}))


# ---------------------------------------------------------------------------------------------
# procedural source
# ---------------------------------------------------------------------------------------------
def test_procedural_source():
    listing = list_objects(SourceConfig(kind="procedural", num_procedural=6, limit=5))
    refs = listing.objects
    assert [r.object_id for r in refs] == [f"procedural-000{i}" for i in range(5)]
    assert refs[3].uri == "procedural://3?seed=0" and refs[3].extra["shape"] == "torus"
    assert parse_procedural_uri(refs[3].uri) == (3, 0, "glb")
    again = list_objects(SourceConfig(kind="procedural", num_procedural=5)).objects
    assert [r.content_hash for r in again] == [r.content_hash for r in refs]
    other = list_objects(SourceConfig(kind="procedural", num_procedural=5, uri="procedural://?seed=7&format=obj"))
    assert other.objects[0].uri == "procedural://0?seed=7&format=obj"
    assert {r.content_hash for r in other.objects}.isdisjoint(r.content_hash for r in refs)
    many = list_objects(SourceConfig(kind="procedural", num_procedural=10001)).objects
    assert many[-1].object_id == "procedural-10000" and many[0].object_id == "procedural-00000"


# ---------------------------------------------------------------------------------------------
# object cache
# ---------------------------------------------------------------------------------------------
def _proc(i: int, fmt: str = "glb") -> ObjectRef:
    return list_objects(SourceConfig(kind="procedural", num_procedural=i + 1,
                                     uri=f"procedural://?format={fmt}")).objects[i]


def test_cache_generates_procedural_and_reuses_it(tmp_path):
    cache = ObjectCache(tmp_path / "cache", max_gb=1)
    ref = _proc(1, "obj")
    path = cache.fetch(ref)
    assert path.suffix == ".obj" and (path.parent / "procedural-0001.mtl").exists()
    assert (path.parent / "procedural-0001.png").exists()
    mtime = path.stat().st_mtime_ns
    assert cache.fetch(ref) == path and path.stat().st_mtime_ns == mtime  # not rebuilt
    # a local dir object is used in place
    local = make_procedural_glb(0, 0, tmp_path / "objs")
    (dref,) = list_objects(SourceConfig(kind="dir", uri=str(tmp_path / "objs"))).objects
    assert cache.fetch(dref) == local
    cache.cleanup()
    assert not (tmp_path / "cache").exists() and local.exists()


def test_cache_evicts_least_recently_used_under_a_tiny_cap(tmp_path):
    s0, s1, s2, s3 = (len(make_procedural_glb(i, 0, tmp_path / "probe").read_bytes()) for i in range(4))
    cap = max(s0 + s2, s0 + s3) + 1  # room for 2 objects, never 3
    assert cap < min(s0 + s1 + s2, s0 + s2 + s3)
    cache = ObjectCache(tmp_path / "cache", max_gb=cap / (1 << 30))
    refs = [_proc(i) for i in range(4)]
    cache.fetch(refs[0])
    cache.fetch(refs[1])
    cache.fetch(refs[0])  # 0 is now more recently used than 1
    cache.fetch(refs[2])  # over the cap: 1 goes
    keys = {p.name for p in (tmp_path / "cache/entries").iterdir()}
    assert keys == {entry_key(refs[0]), entry_key(refs[2])}
    assert cache.total_bytes() <= cache.max_bytes
    with cache.pinned(refs[0]) as p0:  # pinned entries survive even when least recently used
        cache.fetch(refs[2])
        cache.fetch(refs[3])
        assert p0.exists()
    keys = {p.name for p in (tmp_path / "cache/entries").iterdir()}
    assert keys == {entry_key(refs[0]), entry_key(refs[3])}
    big = ObjectCache(tmp_path / "cache2", max_gb=1e-9)  # a single object over the cap is kept
    assert big.fetch(refs[0]).exists()


def _fetch_in_child(args):
    root, index = args
    ref = _proc(index)
    return str(ObjectCache(root, max_gb=1).fetch(ref))


def test_cache_is_safe_between_processes(tmp_path):
    root = str(tmp_path / "cache")
    with multiprocessing.get_context("fork").Pool(3) as pool:
        paths = pool.map(_fetch_in_child, [(root, 2)] * 6)
    assert len(set(paths)) == 1 and Path(paths[0]).exists()
    assert len(list((tmp_path / "cache/entries").iterdir())) == 1
    assert list((tmp_path / "cache/tmp").iterdir()) == []  # no half-built entries left


# ---------------------------------------------------------------------------------------------
# S3 (a real S3-compatible server)
# ---------------------------------------------------------------------------------------------
@pytest.mark.s3
def test_dir_source_on_s3(s3_bucket, tmp_path):
    from geco import storage

    root = make_mixed_folder(tmp_path / "objs")
    prefix = f"{s3_bucket}/datasets/mixed"
    for p in root.rglob("*"):
        if p.is_file():
            storage.upload(p, f"{prefix}/{p.relative_to(root).as_posix()}")
    listing = list_objects(SourceConfig(kind="dir", uri=prefix))
    local = list_objects(SourceConfig(kind="dir", uri=str(root)))
    assert [r.object_id for r in listing.objects] == [r.object_id for r in local.objects]
    assert [r.reason for r in listing.rejected] == [r.reason for r in local.rejected]
    sub = next(r for r in listing.objects if r.object_id == "sub-procedural-0001")
    assert sub.sidecars == (f"{prefix}/sub/procedural-0001.mtl", f"{prefix}/sub/procedural-0001.png")
    broken = next(r for r in listing.objects if r.object_id == "broken-procedural-0002")
    assert broken.extra["missing_textures"] == ["procedural-0002.png"]

    # hashes come from ETag + size: re-uploading the same bytes changes nothing, new bytes do
    storage.upload(root / "sub/procedural-0001.png", f"{prefix}/sub/procedural-0001.png")
    assert {r.object_id: r.content_hash for r in list_objects(SourceConfig(kind="dir", uri=prefix)).objects} == \
        {r.object_id: r.content_hash for r in listing.objects}
    storage.write_bytes(f"{prefix}/sub/procedural-0001.png", b"changed")
    changed = list_objects(SourceConfig(kind="dir", uri=prefix)).objects
    old = {r.object_id: r.content_hash for r in listing.objects}
    assert [r.object_id for r in changed if r.content_hash != old[r.object_id]] == ["sub-procedural-0001"]
    storage.upload(root / "sub/procedural-0001.png", f"{prefix}/sub/procedural-0001.png")  # back as it was

    # the cache downloads the object with its sidecars in the layout the .mtl expects
    cache = ObjectCache(tmp_path / "cache", max_gb=1)
    path = cache.fetch(sub)
    assert path.read_bytes() == (root / "sub/procedural-0001.obj").read_bytes()
    assert (path.parent / "procedural-0001.png").read_bytes() == (root / "sub/procedural-0001.png").read_bytes()
    assert cache.fetch(sub) == path
    glb = next(r for r in listing.objects if r.object_id == "procedural-0000")
    assert cache.fetch(glb).read_bytes() == (root / "procedural-0000.glb").read_bytes()
    cache.cleanup()
    assert not (tmp_path / "cache").exists()


@pytest.mark.s3
def test_gso_on_s3_lays_out_the_texture_alias(s3_bucket, tmp_path):
    from geco import storage

    root = tmp_path / "gso"
    make_gso(root, "Squirrel", 0)
    for p in root.rglob("*"):
        if p.is_file():
            storage.upload(p, f"{s3_bucket}/gso/{p.relative_to(root).as_posix()}")
    (ref,) = list_objects(SourceConfig(kind="gso", uri=f"{s3_bucket}/gso")).objects
    assert ref.extra["aliases"] == {"texture.png": f"{s3_bucket}/gso/Squirrel/materials/textures/texture.png"}
    path = ObjectCache(tmp_path / "cache", max_gb=1).fetch(ref)
    assert path.relative_to(path.parents[1]).as_posix() == "meshes/model.obj"
    assert (path.parent / "texture.png").read_bytes() == (root / "Squirrel/materials/textures/texture.png").read_bytes()
    assert (path.parents[1] / "materials/textures/texture.png").is_file()


# ---------------------------------------------------------------------------------------------
# issue #10: relative paths (1), the kind from the URI (2), unsafe sidecar paths (13)
# ---------------------------------------------------------------------------------------------
def test_relative_local_source_lists_absolute_paths(tmp_path, monkeypatch):
    make_mixed_folder(tmp_path / "objs")
    monkeypatch.chdir(tmp_path)
    listing = list_objects(SourceConfig(kind="dir", uri="objs"))
    assert listing.uri == str(tmp_path / "objs")
    for ref in listing.objects + listing.rejected:
        assert Path(ref.uri).is_absolute() and Path(ref.uri).exists(), ref.uri
        assert all(Path(s).is_absolute() for s in ref.sidecars)
    monkeypatch.chdir("/")  # a renderer runs elsewhere: the refs still point at the files
    assert all(Path(r.uri).is_file() for r in listing.objects)
    # the hash ignores where the folder is: moving it re-renders nothing
    moved = list_objects(SourceConfig(kind="dir", uri=str(tmp_path / "objs")))
    assert source_list_hash(moved.objects) == source_list_hash(listing.objects)


def test_kind_is_detected_from_the_uri(tmp_path, fake_objaverse):
    base, uid_file, _ = fake_objaverse
    assert SourceConfig().kind == "auto"
    folder = make_mixed_folder(tmp_path / "objs")
    make_gso(tmp_path / "gso", "Squirrel", 0)
    cases = {str(folder): "dir", str(tmp_path / "gso"): "gso", str(uid_file): "objaverse", "": "procedural",
             "procedural://?seed=3": "procedural"}
    for uri, kind in cases.items():
        listing = list_objects(SourceConfig(uri=uri, objaverse_cache=str(base), num_procedural=2))
        assert (listing.kind, listing.inferred) == (kind, True), uri
        assert listing.objects and {r.source_kind for r in listing.objects} == {kind}
        assert listing.describe().startswith(f"source: {kind} (detected")
    # an explicit kind still wins, and says it was chosen
    explicit = list_objects(SourceConfig(kind="dir", uri=str(tmp_path / "gso")))
    assert (explicit.kind, explicit.inferred) == ("dir", False)
    assert [r.object_id for r in explicit.objects] == ["Squirrel-meshes-model"]


def test_wrong_source_uris_are_one_line_errors(tmp_path):
    glb = make_procedural_glb(0, 0, tmp_path / "objs")
    for cfg, words in [
            (SourceConfig(uri=str(glb)), "is a file, not a source"),
            (SourceConfig(kind="dir", uri=str(glb)), "not a directory"),
            (SourceConfig(uri=str(tmp_path / "nope")), "no such file or directory"),
            (SourceConfig(kind="procedural", uri=str(tmp_path / "objs")), "set source.kind=auto"),
            (SourceConfig(kind="objaverse", uri=str(tmp_path / "objs")), "is a folder, not a UID list")]:
        with pytest.raises(SourceError, match=words) as err:
            list_objects(cfg)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="source.kind='fbx'"):
        SourceConfig(kind="fbx", uri="x")


@pytest.mark.s3
def test_s3_prefix_is_detected_as_dir(s3_bucket, tmp_path):
    from geco import storage

    make_procedural_glb(0, 0, tmp_path / "objs")
    storage.upload(tmp_path / "objs/procedural-0000.glb", f"{s3_bucket}/objects/procedural-0000.glb")
    listing = list_objects(SourceConfig(uri=f"{s3_bucket}/objects/"))
    assert listing.kind == "dir" and [r.object_id for r in listing.objects] == ["procedural-0000"]


def test_sidecar_paths_that_leave_the_folder_reject_the_object(tmp_path):
    root = tmp_path / "objs"
    obj = make_procedural_object(0, 0, root / "a")
    (tmp_path / "evil.mtl").write_text("newmtl x\nmap_Kd evil.png\n")
    obj.write_text(obj.read_text().replace("mtllib procedural-0000.mtl", "mtllib ../../evil.mtl"))
    tex = make_procedural_object(1, 0, root / "b")
    mtl = tex.with_suffix(".mtl")
    mtl.write_text(mtl.read_text().replace("procedural-0001.png", "/etc/hostname"))
    (root / "c.gltf").write_text(json.dumps({"asset": {"version": "2.0"},
                                             "buffers": [{"uri": "../secret.bin", "byteLength": 1}]}))
    make_procedural_glb(2, 0, root)  # a good neighbour
    listing = list_objects(SourceConfig(kind="dir", uri=str(root)))
    assert [r.object_id for r in listing.objects] == ["procedural-0002"]
    reasons = {r.object_id: r.reason for r in listing.rejected}
    assert set(reasons) == {"a-procedural-0000", "b-procedural-0001", "c"}
    assert "'../../evil.mtl'" in reasons["a-procedural-0000"] and "leaves the source folder" in reasons["c"]
    assert "'/etc/hostname'" in reasons["b-procedural-0001"]
    # GSO: confined to the object's own folder
    make_gso(tmp_path / "gso", "Duck", 0)
    make_gso(tmp_path / "gso", "Squirrel", 1)
    m = tmp_path / "gso/Duck/meshes/model.mtl"
    m.write_text(m.read_text().replace("texture.png", "../../Squirrel/materials/textures/texture.png"))
    gso = list_objects(SourceConfig(kind="gso", uri=str(tmp_path / "gso")))
    assert [r.object_id for r in gso.objects] == ["gso-Squirrel"]
    assert "leaves the object's folder Duck/" in gso.rejected[0].reason


def test_cache_refuses_paths_that_leave_its_entry(tmp_path):
    cache = ObjectCache(tmp_path / "cache", max_gb=1)
    glb = make_procedural_glb(0, 0, tmp_path / "objs")
    aliased = ObjectRef("x", str(glb), (), "h1", None, "dir", {"aliases": {"../../../escaped.glb": str(glb)}})
    s3 = ObjectRef("y", "s3://bucket/objs/y.obj", ("s3://bucket/objs/../../../../escaped.mtl",), "h2", None, "dir")
    for ref in (aliased, s3):
        with pytest.raises(UnsafePath, match="refusing the object"):
            cache.fetch(ref)
    assert not list(tmp_path.rglob("escaped*"))
    assert list((tmp_path / "cache/entries").iterdir()) == [] and list((tmp_path / "cache/tmp").iterdir()) == []
