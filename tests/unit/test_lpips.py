"""geco.models.lpips: torchvision-compatible key names, loading from every kind of source, the
distance's structure (for any weights), and the "unavailable" behaviour of the loss and metric."""
from __future__ import annotations

import logging
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from geco.models import lpips as L
from geco.models.lpips import LPIPS, LPIPSLoss, LPIPSMetric, LPIPSUnavailable, load_lpips

# torchvision's AlexNet / VGG16 ``features`` conv indices (Conv2d modules in its Sequential)
ALEX_CONVS = (0, 3, 6, 8, 10)
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
ALEX_SHAPES = [(64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3)]
VGG16_OUT = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def torchvision_keys(convs):
    return [f"features.{i}.{p}" for i in convs for p in ("weight", "bias")]


def torchvision_state_dict(net: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict laid out exactly as torchvision's (features + classifier)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    if net == "alex":
        shapes = ALEX_SHAPES
        convs = ALEX_CONVS
        classifier = (1, 4, 6)
    else:
        c_in, shapes = 3, []
        for c in VGG16_OUT:
            shapes.append((c, c_in, 3, 3))
            c_in = c
        convs = VGG16_CONVS
        classifier = (0, 3, 6)
    for i, shp in zip(convs, shapes):
        fan_in = shp[1] * shp[2] * shp[3]
        sd[f"features.{i}.weight"] = torch.randn(shp, generator=g) * (2.0 / fan_in) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(shp[0], generator=g) * 0.01
    for i in classifier:  # small stand-ins: only the key names matter, they are never loaded
        sd[f"classifier.{i}.weight"] = torch.zeros(1)
        sd[f"classifier.{i}.bias"] = torch.zeros(1)
    return sd


def linear_state_dict(net: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) + 0.01
            for k, c in enumerate(L.CHANNELS[net])}


@pytest.fixture(scope="module")
def alex():
    m = LPIPS("alex")
    m.load_backbone(torchvision_state_dict("alex"))
    m.load_linear(linear_state_dict("alex"))
    return m


@pytest.fixture
def imgs():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 64, 64, generator=g)
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


# -- key names -----------------------------------------------------------------------------------
def test_backbone_keys_match_torchvision_exactly():
    assert list(L.Backbone("alex").state_dict()) == torchvision_keys(ALEX_CONVS)
    assert list(L.Backbone("vgg").state_dict()) == torchvision_keys(VGG16_CONVS)
    shapes = [tuple(v.shape) for k, v in L.Backbone("alex").state_dict().items() if k.endswith("weight")]
    assert shapes == ALEX_SHAPES
    vgg = L.Backbone("vgg").state_dict()
    assert [vgg[f"features.{i}.weight"].shape[0] for i in VGG16_CONVS] == list(VGG16_OUT)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_keys(net):
    keys = list(LPIPS(net).state_dict())
    lin = [k for k in keys if k.startswith("lin")]
    assert lin == [f"lin{k}.model.1.weight" for k in range(5)]
    convs = ALEX_CONVS if net == "alex" else VGG16_CONVS
    assert [k for k in keys if k.startswith("net.")] == ["net." + k for k in torchvision_keys(convs)]
    assert len(keys) == len(lin) + 2 * len(convs)  # scaling constants are not state
    shapes = [tuple(v.shape) for k, v in LPIPS(net).state_dict().items() if k.startswith("lin")]
    assert shapes == [(1, c, 1, 1) for c in L.CHANNELS[net]]


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_torchvision_format_file_loads(tmp_path, net):
    sd = torchvision_state_dict(net)
    torch.save(sd, tmp_path / "tv.pth")
    torch.save(linear_state_dict(net), tmp_path / "lin.pth")
    m = load_lpips(net, str(tmp_path / "tv.pth"), str(tmp_path / "lin.pth"), allow_download=False)
    first = ALEX_CONVS[0] if net == "alex" else VGG16_CONVS[0]
    assert torch.equal(m.net.features[first].weight, sd[f"features.{first}.weight"])
    assert m.sources == {"backbone": str(tmp_path / "tv.pth"), "linear": str(tmp_path / "lin.pth")}
    assert not m.training and not any(p.requires_grad for p in m.parameters())


def test_wrong_files_are_reported(tmp_path):
    torch.save(torchvision_state_dict("alex"), tmp_path / "alex.pth")
    torch.save(linear_state_dict("alex"), tmp_path / "lin_alex.pth")
    with pytest.raises(LPIPSUnavailable, match="not a torchvision VGG16"):
        load_lpips("vgg", str(tmp_path / "alex.pth"), str(tmp_path / "lin_alex.pth"), allow_download=False)
    torch.save(torchvision_state_dict("vgg"), tmp_path / "vgg.pth")
    with pytest.raises(LPIPSUnavailable, match="another trunk"):
        load_lpips("vgg", str(tmp_path / "vgg.pth"), str(tmp_path / "lin_alex.pth"), allow_download=False)


class Arbitrary:
    """A pickled object of an arbitrary class: torch.load(weights_only=True) must refuse it."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"features.0.weight": torch.zeros(1), "x": Arbitrary()}, tmp_path / "bad.pth")
    with pytest.raises(LPIPSUnavailable, match="plain state dict"):
        load_lpips("alex", str(tmp_path / "bad.pth"), allow_download=False)


# -- the distance, for any weights ---------------------------------------------------------------
def test_identity_symmetry_positivity(alex, imgs):
    x, y = imgs
    d_xx = alex(x, x)
    assert d_xx.shape == (2,) and torch.all(d_xx == 0)
    d_xy, d_yx = alex(x, y), alex(y, x)
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-5, atol=1e-7)
    assert torch.all(d_xy > 0)  # linear weights >= 0 make every term >= 0


def test_batch_items_are_independent_and_layers_sum(alex, imgs):
    x, y = imgs
    d, terms = alex(x, y, per_layer=True)
    assert len(terms) == 5 and all(t.shape == (2,) for t in terms)
    torch.testing.assert_close(d, sum(terms))
    torch.testing.assert_close(alex(x[1:], y[1:]), d[1:], rtol=1e-5, atol=1e-7)


def test_input_range_flag(alex, imgs):
    x, y = imgs
    m11 = LPIPS("alex", input_range="[-1,1]")
    m11.load_state_dict(alex.state_dict())
    torch.testing.assert_close(m11(2 * x - 1, 2 * y - 1), alex(x, y))
    torch.testing.assert_close(alex(2 * x - 1, 2 * y - 1, input_range="[-1,1]"), alex(x, y))
    with pytest.raises(ValueError):
        alex(x[:, :2], y[:, :2])


def test_gradients_reach_inputs_not_weights(alex, imgs):
    x, y = imgs
    x = x.clone().requires_grad_(True)
    alex(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in alex.parameters())
    parent = torch.nn.Sequential(alex)
    parent.train()
    assert not alex.training  # frozen in eval mode whatever the parent does


# LPIPS's ScalingLayer (richzhang/PerceptualSimilarity, lpips/lpips.py, class ScalingLayer):
# inputs in [-1, 1] are shifted and scaled per RGB channel before the trunk. Written out here, not read
# from geco.models.lpips, so that the reference below is independent of the module's constants.
UPSTREAM_SHIFT = torch.tensor([-0.030, -0.088, -0.188])
UPSTREAM_SCALE = torch.tensor([0.458, 0.448, 0.450])


def _reference_distance(net, sd, lin, x, y):
    """An independent functional LPIPS from torchvision's documented layer list."""
    if net == "alex":
        plan = [("c", 0, 4, 2), "r", ("p", 3, 2), ("c", 3, 1, 2), "r", ("p", 3, 2), ("c", 6, 1, 1), "r",
                ("c", 8, 1, 1), "r", ("c", 10, 1, 1), "r"]
        taps = {1, 4, 7, 9, 11}
    else:
        plan, taps = [], {3, 8, 15, 22, 29}
        i = 0
        for block in (2, 2, 3, 3, 3):
            for _ in range(block):
                plan += [("c", i, 1, 1), "r"]
                i += 2
            plan.append(("p", 2, 2))
            i += 1
        plan = plan[:30]

    def feats(z):
        out = []
        z = (z * 2 - 1 - UPSTREAM_SHIFT.view(1, 3, 1, 1)) / UPSTREAM_SCALE.view(1, 3, 1, 1)
        for j, op in enumerate(plan):
            if op == "r":
                z = F.relu(z)
            elif op[0] == "c":
                z = F.conv2d(z, sd[f"features.{op[1]}.weight"], sd[f"features.{op[1]}.bias"], op[2], op[3])
            else:
                z = F.max_pool2d(z, op[1], op[2])
            if j in taps:
                out.append(z)
        return out

    d = 0
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        d = d + ((a - b) ** 2 * lin[f"lin{k}.model.1.weight"]).sum(1).mean((1, 2))
    return d


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_an_independent_reference(net, imgs):
    x, y = (t[:, :, :48, :48] for t in imgs)
    sd, lin = torchvision_state_dict(net), linear_state_dict(net)
    m = LPIPS(net)
    m.load_backbone(sd)
    m.load_linear(lin)
    torch.testing.assert_close(m(x, y), _reference_distance(net, sd, lin, x, y), rtol=1e-4, atol=1e-7)


def test_against_torchvision_and_lpips_when_installed(imgs):
    """Where torchvision (and the lpips package) import — the GPU test machine — compare with them."""
    tv = pytest.importorskip("torchvision")
    x, y = imgs
    for net, make in (("alex", tv.models.alexnet), ("vgg", tv.models.vgg16)):
        ref = make().eval()
        ours = LPIPS(net)
        ours.load_backbone(ref.state_dict())
        taps = L._TAPS[net]
        z, want = x * 2 - 1, []
        with torch.no_grad():
            for i, layer in enumerate(ref.features):
                z = layer(z.clone())
                if i in taps:
                    want.append(z.clone())
            got = ours.net(x * 2 - 1)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        try:
            import lpips as lp
        except Exception:
            continue
        ref_l = lp.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
        with torch.no_grad():
            for s in range(1, 6):
                for idx, mod in getattr(ref_l.net, f"slice{s}").named_children():
                    if isinstance(mod, torch.nn.Conv2d):
                        mod.weight.copy_(ref.features[int(idx)].weight)
                        mod.bias.copy_(ref.features[int(idx)].bias)
            ours.load_linear({k: v for k, v in ref_l.state_dict().items() if k.startswith("lin")})
            torch.testing.assert_close(ours(x, y), ref_l(x, y, normalize=True).flatten(), rtol=1e-5, atol=1e-7)


# -- discovery -----------------------------------------------------------------------------------
def test_hub_cache_discovery(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    assert L.hub_checkpoint_dir() == ckpt
    torch.save(torchvision_state_dict("alex"), ckpt / "alexnet-owt-7be5be79.pth")
    torch.save(linear_state_dict("alex"), ckpt / "lpips-v0.1-alex.pth")
    m = load_lpips("alex", allow_download=False)
    assert m.sources == {"backbone": str(ckpt / "alexnet-owt-7be5be79.pth"),
                         "linear": str(ckpt / "lpips-v0.1-alex.pth")}


def test_safetensors_and_cache_dir(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    save_file(torchvision_state_dict("alex"), str(tmp_path / "alexnet-owt-7be5be79.safetensors"))
    lin_dir = tmp_path / "lpips" / "weights" / "v0.1"
    lin_dir.mkdir(parents=True)
    torch.save(linear_state_dict("alex"), lin_dir / "alex.pth")
    m = load_lpips("alex", cache_dir=tmp_path, allow_download=False)
    assert m.sources["backbone"].endswith(".safetensors")
    assert m.sources["linear"] == str(lin_dir / "alex.pth")


def test_installed_lpips_package_is_found_without_importing_it(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing lpips pulls in torchvision')\n")
    torch.save(linear_state_dict("vgg"), pkg / "weights" / "v0.1" / "vgg.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "lpips", raising=False)  # where a real one was imported before
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert pkg / "weights" / "v0.1" / "vgg.pth" in L.linear_candidates("vgg")
    torch.save(torchvision_state_dict("vgg"), tmp_path / "vgg16.pth")
    m = load_lpips("vgg", backbone_weights=str(tmp_path / "vgg16.pth"), allow_download=False)
    assert m.sources["linear"] == str(pkg / "weights" / "v0.1" / "vgg.pth")


def test_weights_imported_by_geco_load(tmp_path, monkeypatch):
    """``geco weights import`` output (safetensors) is a valid LPIPS source."""
    from geco.weights import import_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    up = tmp_path / "upstream"
    up.mkdir()
    torch.save(torchvision_state_dict("alex"), up / "alexnet-owt-7be5be79.pth")
    torch.save(linear_state_dict("alex"), up / "alex.pth")
    import_weights(str(up), str(tmp_path / "lpips-weights"))
    m = load_lpips("alex", linear_weights=str(tmp_path / "lpips-weights" / "alex.safetensors"),
                   cache_dir=tmp_path / "lpips-weights", allow_download=False)
    assert m.sources["backbone"] == str(tmp_path / "lpips-weights" / "alexnet-owt-7be5be79.safetensors")


def test_url_source_is_cached_and_hash_checked(tmp_path, monkeypatch):
    """A URL is fetched once into the cache (file:// stands in for https:// offline); a
    torchvision-style name ``*-<8 hex>.pth`` must match the file's sha256, as torch.hub checks."""
    monkeypatch.delenv("GECO_OFFLINE", raising=False)  # conftest turns downloads off; this test needs them
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    src = tmp_path / "src"
    src.mkdir()
    torch.save(torchvision_state_dict("alex"), src / "alexnet.pth")
    torch.save(linear_state_dict("alex"), src / "alex.pth")
    m = load_lpips("alex", (src / "alexnet.pth").as_uri(), (src / "alex.pth").as_uri())
    assert m.sources["backbone"] == (src / "alexnet.pth").as_uri()
    cached = L.hub_checkpoint_dir() / "alexnet.pth"
    assert cached.is_file()
    (src / "alexnet.pth").unlink()  # the second load reads the cache
    load_lpips("alex", (src / "alexnet.pth").as_uri(), (src / "alex.pth").as_uri(), allow_download=False)
    (src / "alexnet.pth.bak").write_bytes(cached.read_bytes())
    (src / "alexnet.pth.bak").rename(src / "alexnet-owt-7be5be79.pth")
    with pytest.raises(LPIPSUnavailable, match="does not match"):
        load_lpips("alex", (src / "alexnet-owt-7be5be79.pth").as_uri(), (src / "alex.pth").as_uri())
    assert not (L.hub_checkpoint_dir() / "alexnet-owt-7be5be79.pth").exists()
    assert not [p for p in L.hub_checkpoint_dir().iterdir() if p.name.endswith(".part")]


def test_unreachable_url_and_offline_are_graceful(tmp_path, monkeypatch):
    monkeypatch.delenv("GECO_OFFLINE", raising=False)  # the loopback URL is refused at once
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(LPIPSUnavailable, match="download failed"):
        load_lpips("alex", "http://127.0.0.1:9/alexnet.pth")
    monkeypatch.setenv("GECO_OFFLINE", "1")
    with pytest.raises(LPIPSUnavailable) as e:
        load_lpips("vgg")
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and "downloads off" in msg


@pytest.mark.s3
def test_s3_source(tmp_path, s3_bucket):
    from geco import storage

    torch.save(torchvision_state_dict("alex"), tmp_path / "a.pth")
    torch.save(linear_state_dict("alex"), tmp_path / "l.pth")
    storage.upload(tmp_path / "a.pth", f"{s3_bucket}/lpips/alexnet-owt-7be5be79.pth")
    storage.upload(tmp_path / "l.pth", f"{s3_bucket}/lpips/alex.pth")
    m = load_lpips("alex", f"{s3_bucket}/lpips/alexnet-owt-7be5be79.pth", f"{s3_bucket}/lpips/alex.pth",
                   allow_download=False)
    assert m.sources["backbone"].startswith("s3://")
    with pytest.raises(LPIPSUnavailable, match="cannot be read"):
        load_lpips("alex", f"{s3_bucket}/lpips/missing.pth", allow_download=False)


# -- unavailable ---------------------------------------------------------------------------------
def test_loss_is_switched_off_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with caplog.at_level(logging.WARNING, logger="geco.models.lpips"):
        loss = LPIPSLoss.load("vgg", allow_download=False, weight=1.0)
    assert not loss.enabled and "no vgg backbone weights found" in loss.reason
    assert "LPIPS loss term is OFF" in caplog.text
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    with pytest.warns(L.LPIPSUnavailableWarning, match="off"):
        out = loss(x, torch.rand(1, 3, 32, 32))
    assert out.shape == () and out.item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        assert loss(x, x).item() == 0.0


def test_loss_when_available(alex, imgs):
    x, y = imgs
    loss = LPIPSLoss(alex, weight=0.5)
    assert loss.enabled
    torch.testing.assert_close(loss(x, y), 0.5 * alex(x, y).mean())


def test_metric_reports_unavailable(tmp_path, monkeypatch, alex, imgs):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    metric = LPIPSMetric.load("alex", allow_download=False)
    assert not metric.available and "alexnet-owt-7be5be79.pth" in metric.reason
    assert metric(*imgs) is None
    with pytest.raises(LPIPSUnavailable, match="no alex backbone weights"):
        L.lpips_metric(*imgs, net="alex", allow_download=False)
    ok = LPIPSMetric(alex)
    assert ok.available and ok(*imgs).shape == (2,)


def test_real_linear_weights_when_present():
    """The lpips package's own v0.1 files (if installed) load with weights_only and our key names."""
    pkg = L._lpips_package_dir()
    if pkg is None or not (pkg / "weights" / "v0.1" / "vgg.pth").is_file():
        pytest.skip("lpips package not installed")
    m = LPIPS("vgg")
    m.load_linear(L._read_state_dict(pkg / "weights" / "v0.1" / "vgg.pth"), "lpips package")
    assert all((lin.model[1].weight >= 0).all() for lin in m.lins)
