"""geco.weights: upstream folders/files -> safetensors + checksum manifest, local and on S3."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli.main import main as cli
from geco import storage
from geco.weights import MANIFEST, WeightsImportError, import_weights, read_manifest, safetensors_name, verify_weights


class Arbitrary:
    """Any pickled class instance: weights_only loading must refuse it."""


def make_model_folder(root: Path) -> dict[str, torch.Tensor]:
    """A diffusers/transformers-like folder: a pickled .bin, a Lightning .ckpt, configs."""
    g = torch.Generator().manual_seed(0)
    unet = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g),
            "half": torch.randn(5, generator=g).half()}
    (root / "unet").mkdir(parents=True)
    torch.save(unet, root / "unet" / "diffusion_pytorch_model.bin")
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    tied = torch.randn(6, 2, generator=g)
    torch.save({"state_dict": {"enc.w": tied, "dec.w": tied, "view": tied[:, 0]}, "epoch": 3,
                "hyper_parameters": {"lr": 1e-4}}, root / "model.ckpt")
    (root / "model_index.json").write_text('{"_class_name": "Zero123PlusPipeline"}\n')
    (root / "notes.txt").write_text("hello\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return unet


def test_import_folder(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    unet = make_model_folder(src)
    uri = import_weights(str(src), str(dest))
    assert uri == str(dest / MANIFEST)
    got = load_file(str(dest / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(got) == set(unet)
    for k in unet:
        assert torch.equal(got[k], unet[k]) and got[k].dtype == unet[k].dtype
    ckpt = load_file(str(dest / "model.safetensors"))  # Lightning state_dict unwrapped
    assert set(ckpt) == {"enc.w", "dec.w", "view"} and torch.equal(ckpt["enc.w"], ckpt["dec.w"])
    assert (dest / "unet" / "config.json").read_bytes() == (src / "unet" / "config.json").read_bytes()
    assert (dest / "notes.txt").read_text() == "hello\n"
    assert not (dest / ".git").exists()
    assert not list(dest.rglob("*.bin")) and not list(dest.rglob("*.ckpt"))

    m = json.loads((dest / MANIFEST).read_text())
    assert m["source"] == str(src) and m["source_kind"] == "local" and m["created"]
    paths = [e["path"] for e in m["files"]]
    assert paths == sorted(["model.safetensors", "model_index.json", "notes.txt", "unet/config.json",
                            "unet/diffusion_pytorch_model.safetensors"])
    for e in m["files"]:
        assert e["size"] == (dest / e["path"]).stat().st_size and len(e["sha256"]) == 64
    e = next(e for e in m["files"] if e["path"] == "model.safetensors")
    assert e["source_path"] == "model.ckpt" and e["tensors"] == 3
    notes = " | ".join(m["notes"])
    assert "unwrapped nested 'state_dict'" in notes and "'epoch'" in notes and "copies" in notes


def test_verify_and_tamper(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_model_folder(src)
    import_weights(str(src), str(dest))
    res = verify_weights(str(dest))
    assert res.ok and res.checked == 5 and not res.extra
    assert verify_weights(str(dest / MANIFEST)).ok  # the manifest path works too

    f = dest / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    f.write_bytes(bytes(data))
    (dest / "stray.txt").write_text("x")
    (dest / "notes.txt").unlink()
    res = verify_weights(str(dest))
    assert not res.ok
    assert any("diffusion_pytorch_model.safetensors: sha256" in p for p in res.problems)
    assert any("notes.txt: missing" in p for p in res.problems)
    assert res.extra == ["stray.txt"]
    assert "FAILED" in res.summary()


def test_pickled_objects_are_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"w": torch.zeros(2), "obj": Arbitrary()}, src / "evil.pth")
    with pytest.raises(WeightsImportError, match=r"evil\.pth: refused: it holds pickled Python objects"):
        import_weights(str(src), str(tmp_path / "dest"))
    assert not (tmp_path / "dest" / MANIFEST).exists()  # nothing marked as imported


def test_single_file_and_existing_import(tmp_path):
    torch.save({"features.0.weight": torch.ones(2, 2)}, tmp_path / "alexnet-owt-7be5be79.pth")
    dest = tmp_path / "lpips"
    import_weights(str(tmp_path / "alexnet-owt-7be5be79.pth"), str(dest))
    assert torch.equal(load_file(str(dest / "alexnet-owt-7be5be79.safetensors"))["features.0.weight"],
                       torch.ones(2, 2))
    with pytest.raises(WeightsImportError, match="already holds an import"):
        import_weights(str(tmp_path / "alexnet-owt-7be5be79.pth"), str(dest))
    import_weights(str(tmp_path / "alexnet-owt-7be5be79.pth"), str(dest), overwrite=True)


def test_transformers_names_and_shard_index(tmp_path):
    src = tmp_path / "src"
    (src / "text_encoder").mkdir(parents=True)
    torch.save({"a": torch.zeros(1)}, src / "text_encoder" / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.ones(1)}, src / "text_encoder" / "pytorch_model-00002-of-00002.bin")
    (src / "text_encoder" / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 8}, "weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                                                        "b": "pytorch_model-00002-of-00002.bin"}}))
    # a pickle whose safetensors twin exists is not converted again
    save_file({"x": torch.zeros(1)}, str(src / "vae.safetensors"))
    torch.save({"x": torch.ones(1)}, src / "vae.bin")
    dest = tmp_path / "dest"
    import_weights(str(src), str(dest))
    index = json.loads((dest / "text_encoder" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    assert (dest / "text_encoder" / "model-00002-of-00002.safetensors").is_file()
    assert torch.equal(load_file(str(dest / "vae.safetensors"))["x"], torch.zeros(1))
    assert "vae.bin: skipped" in " ".join(read_manifest(str(dest))["notes"])
    assert verify_weights(str(dest)).ok
    assert safetensors_name("a/pytorch_model.bin") == "a/model.safetensors"
    assert safetensors_name("b/weights.pth") == "b/weights.safetensors"


def test_missing_source_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(WeightsImportError, match="no such file"):
        import_weights(str(tmp_path / "nope"), str(tmp_path / "dest"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty local cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsImportError) as e:
        import_weights("sudo-ai/zero123plus-v1.2", str(tmp_path / "dest"))
    msg = str(e.value)
    assert "'sudo-ai/zero123plus-v1.2'" in msg and "local folder" in msg and "HF_HUB_OFFLINE" in msg


def test_hub_id_served_from_the_local_hf_cache_offline(tmp_path, monkeypatch):
    """Offline, a model already in the HF cache imports through snapshot_download."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny"
    make_model_folder(repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    import_weights("acme/tiny", str(tmp_path / "dest"))
    m = read_manifest(str(tmp_path / "dest"))
    assert m["source"] == "acme/tiny" and m["source_kind"] == "hf" and len(m["files"]) == 5


@pytest.mark.s3
def test_s3_destination_and_source(tmp_path, s3_bucket):
    src = tmp_path / "src"
    unet = make_model_folder(src)
    dest = f"{s3_bucket}/weights/zero123plus"
    uri = import_weights(str(src), dest)
    assert uri == f"{dest}/{MANIFEST}"
    local = storage.download(f"{dest}/unet/diffusion_pytorch_model.safetensors", tmp_path / "u.safetensors")
    assert torch.equal(load_file(str(local))["conv.weight"], unet["conv.weight"])
    res = verify_weights(dest)
    assert res.ok and res.checked == 5
    storage.write_text(f"{dest}/notes.txt", "changed\n")
    res = verify_weights(dest)
    assert not res.ok and "notes.txt" in res.problems[0]
    # an S3 prefix is a source too (a pickled file there is converted the same way)
    storage.upload(src / "unet" / "diffusion_pytorch_model.bin", f"{s3_bucket}/raw/unet/w.bin")
    import_weights(f"{s3_bucket}/raw", str(tmp_path / "from-s3"))
    assert set(load_file(str(tmp_path / "from-s3" / "unet" / "w.safetensors"))) == set(unet)


def test_cli(tmp_path, capsys):
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_model_folder(src)
    assert cli(["weights", "import", str(src), str(dest)]) == 0
    out = capsys.readouterr().out
    assert "imported 5 file(s)" in out and MANIFEST in out
    assert cli(["weights", "verify", str(dest)]) == 0
    assert "OK: 5 file(s)" in capsys.readouterr().out
    (dest / "notes.txt").write_text("tampered\n")
    assert cli(["weights", "verify", str(dest)]) == 1
    assert cli(["weights", "verify", str(tmp_path / "nothing")]) == 2
    assert "no manifest" in capsys.readouterr().err
