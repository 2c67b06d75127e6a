"""CIFAR-10-C style corruptions: determinism, shape/dtype/range, severity ordering, errors."""

import pytest
import torch
import torch.nn.functional as F

from convpeft.data.corruptions import corrupt, get_corruption, list_corruptions

EXPECTED = {
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur",
    "gaussian_blur", "motion_blur", "contrast", "brightness", "saturate", "pixelate",
    "jpeg_compression", "elastic_transform", "fog",
}
# Published CIFAR-10-C parameters that are not ordered by pixel error (documented in the module)
NOT_MONOTONE = {"pixelate", "saturate", "elastic_transform"}
DETERMINISTIC_FNS = {"defocus_blur", "gaussian_blur", "contrast", "brightness", "saturate",
                     "pixelate", "jpeg_compression"}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Smooth, colourful (6, 3, 32, 32) images in [0.1, 0.9]: like natural photos, not noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 6, 6, generator=g)
    x = F.interpolate(x, size=32, mode="bicubic", align_corners=False).clamp(0, 1)
    return 0.1 + 0.8 * x


def test_registry_has_the_fourteen():
    assert EXPECTED <= set(list_corruptions())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_severity_deterministic_shape_range(name, images):
    errors = []
    for s in range(1, 6):
        a = corrupt(images, name, s, seed=3)
        b = corrupt(images, name, s, seed=3)
        assert torch.equal(a, b), f"{name} s{s} not deterministic"
        assert a.shape == images.shape and a.dtype == images.dtype
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        assert not torch.equal(a, images), f"{name} s{s} changed nothing"
        if name not in DETERMINISTIC_FNS:
            assert not torch.equal(a, corrupt(images, name, s, seed=4)), "seed has no effect"
        errors.append(float((a - images).abs().mean()))
    if name == "elastic_transform":
        return  # pixel error shrinks with severity (affine part); see test_elastic_warp_grows
    assert errors[4] > errors[0], f"{name}: severity 5 no worse than 1: {errors}"
    if name not in NOT_MONOTONE:
        for lo, hi in zip(errors, errors[1:], strict=False):
            assert hi >= lo * 0.98, f"{name}: error does not grow with severity: {errors}"


def test_elastic_warp_grows_with_severity():
    # An affine warp maps a linear ramp to a linear image (zero Laplacian); only the local
    # elastic displacement bends it. So the Laplacian of the output measures the elastic part.
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(8, 3, 32, 32).contiguous()
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    rough = []
    for s in range(1, 6):
        out = corrupt(ramp, "elastic_transform", s, seed=0)[:, :1, 6:-6, 6:-6]
        rough.append(float(F.conv2d(out, lap).abs().mean()))
    assert rough[0] < 1e-4 and all(b > a for a, b in zip(rough[:-1], rough[1:], strict=True)), rough


def test_uint8_in_uint8_out(images):
    u8 = (images * 255).round().to(torch.uint8)
    out = corrupt(u8, "gaussian_noise", 3, seed=0)
    assert out.dtype == torch.uint8 and out.shape == u8.shape
    ref = corrupt(u8.float() / 255, "gaussian_noise", 3, seed=0)
    assert (out.float() - ref * 255).abs().max() <= 0.5 + 1e-3


def test_known_parameter_values(images):
    # contrast severity 1 = (x - mean) * .75 + mean, per image and channel
    m = images.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(corrupt(images, "contrast", 1), (images - m) * 0.75 + m)
    # gaussian noise severity 5 has std 0.10 (away from the clipping range)
    flat = torch.full((4, 3, 32, 32), 0.5)
    std = float((corrupt(flat, "gaussian_noise", 5, seed=1) - 0.5).std())
    assert abs(std - 0.10) < 0.005
    # impulse noise severity 5 hits ~7% of the values, each set to 0 or 1
    out = corrupt(flat, "impulse_noise", 5, seed=1)
    hit = (out != 0.5).float().mean()
    assert 0.06 < float(hit) < 0.08 and set(out[out != 0.5].unique().tolist()) <= {0.0, 1.0}


def test_mix_assigns_each_image_one_corruption(images):
    mix = corrupt(images, ["contrast", "brightness"], 3, seed=0)
    c = corrupt(images, "contrast", 3)
    b = corrupt(images, "brightness", 3)
    for i in range(len(images)):
        assert torch.allclose(mix[i], c[i]) or torch.allclose(mix[i], b[i])


def test_other_resolutions(images):
    big = F.interpolate(images, size=48, mode="bilinear")
    for name in sorted(EXPECTED):
        out = corrupt(big, name, 5, seed=0)
        assert out.shape == big.shape


@pytest.mark.parametrize("severity", [0, 6, 2.5, True])
def test_bad_severity(images, severity):
    with pytest.raises(ValueError, match="severity must be an integer 1..5"):
        corrupt(images, "fog", severity)


def test_unknown_corruption(images):
    with pytest.raises(ValueError, match="unknown corruption 'snowstorm'; use one of"):
        corrupt(images, "snowstorm", 1)
    with pytest.raises(ValueError, match="unknown corruption"):
        get_corruption("frost")
