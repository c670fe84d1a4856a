"""geco.metrics: PSNR and SSIM per image, SSIM against scikit-image's reference implementation."""
import numpy as np
import pytest
import torch

from geco.metrics import mean_psnr, psnr, ssim


def _images(seed: int, shape=(2, 3, 32, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g)
    b = (a + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    return a, b


def test_psnr_per_image():
    a, b = _images(0)
    got = psnr(b, a)
    assert got.shape == (2,)
    for i in range(2):
        mse = float(((b[i] - a[i]) ** 2).mean())
        assert got[i].item() == pytest.approx(-10 * np.log10(mse), abs=1e-4)
    assert mean_psnr(b, a) == pytest.approx(float(got.mean()))
    assert psnr(a, a).min().item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:, :, :-1])


@pytest.mark.parametrize("shape", [(2, 3, 32, 40), (1, 3, 64, 64), (3, 1, 16, 16)])
def test_ssim_matches_scikit_image(shape):
    skm = pytest.importorskip("skimage.metrics")
    a, b = _images(1, shape)
    got = ssim(b, a)
    for i in range(shape[0]):
        ref = skm.structural_similarity(a[i].numpy(), b[i].numpy(), channel_axis=0, data_range=1.0,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert got[i].item() == pytest.approx(ref, abs=1e-5), (i, got[i].item(), ref)


def test_ssim_orders_degradations_and_keeps_leading_dims():
    a, _ = _images(2, (6, 3, 24, 24))
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(3))
    mild, strong = (a + 0.05 * noise).clamp(0, 1), (a + 0.3 * noise).clamp(0, 1)
    assert torch.allclose(ssim(a, a), torch.ones(6), atol=1e-6)
    assert (ssim(mild, a) > ssim(strong, a)).all()
    assert ssim(mild.view(2, 3, 3, 24, 24), a.view(2, 3, 3, 24, 24)).shape == (2, 3)


def test_paired_psnr_margin_rewards_matching_images_and_not_a_mean():
    from geco.metrics import paired_psnr_margin

    g = torch.Generator().manual_seed(0)
    targets = torch.rand(3, 3, 8, 8, generator=g)
    noisy = (targets + 0.05 * torch.randn(3, 3, 8, 8, generator=g)).clamp(0, 1)
    margin = paired_psnr_margin(noisy, targets)
    expected = [float(psnr(noisy[i], targets[i])) - max(float(psnr(noisy[i], targets[j])) for j in range(3) if j != i)
                for i in range(3)]  # own minus the closest other
    assert margin.shape == (3,) and bool((margin > 10).all())
    assert margin.tolist() == pytest.approx(expected, abs=1e-4)
    same = targets.mean(0, keepdim=True).expand(3, -1, -1, -1)  # one image for every input: no margin on average
    assert float(paired_psnr_margin(same, targets).min()) <= 0.0
    with pytest.raises(ValueError, match="2 or more"):
        paired_psnr_margin(targets[:1], targets[:1])
