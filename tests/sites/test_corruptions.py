"""Corruptions (medfed.sites.corruptions): every registered one, on tiny generated batches."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.sites.corruptions import (
    CorruptionError, corrupt, default_corruptions, list_corruptions,
)


def _batch(side: int, channels: int, n: int = 4) -> np.ndarray:
    """Smooth structure plus texture, mid-range intensities: every corruption has something to change."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    base = (np.sin(xx / side * 7) + np.cos(yy / side * 5)) * 50 + 128
    images = np.clip(np.stack([base + rng.normal(0, 10, (side, side)) for _ in range(n)]), 0, 255).astype(np.uint8)
    if channels == 3:
        images = np.stack([images, images[:, ::-1], images.transpose(0, 2, 1)], axis=-1)
    return images


def _cases():
    for name in list_corruptions():
        for channels in (1, 3):
            if name == "saturate" and channels == 1:
                continue
            yield pytest.param(name, channels, id=f"{name}-{'rgb' if channels == 3 else 'gray'}")


@pytest.mark.parametrize(("name", "channels"), list(_cases()))
def test_change_grows_with_severity_and_keeps_dtype_shape_and_seed(name, channels):
    # Prepare
    images = _batch(28, channels)
    before = images.copy()
    # Execute
    outputs = [corrupt(images, name, severity, seed=3) for severity in range(1, 6)]
    again = corrupt(images, name, 5, seed=3)
    # Assert
    differences = [np.abs(out.astype(float) - images).mean() for out in outputs]
    assert differences[0] > 0
    assert all(later > earlier for earlier, later in zip(differences, differences[1:])), differences
    assert all(out.dtype == np.uint8 and out.shape == images.shape for out in outputs)
    np.testing.assert_array_equal(again, outputs[-1])
    np.testing.assert_array_equal(images, before)  # the input is not modified


@pytest.mark.parametrize("name", ["gaussian_noise", "motion_blur", "bubble", "characters"])
def test_other_seed_gives_other_random_corruption(name):
    images = _batch(28, 1)
    assert not np.array_equal(corrupt(images, name, 3, seed=0), corrupt(images, name, 3, seed=1))


def test_gray_without_channel_axis_and_larger_images_keep_their_shape():
    # Prepare: [N, H, W] at 64 px, RGB at 128 px (one image: keep the test fast).
    gray, rgb = _batch(64, 1, n=2), _batch(128, 3, n=1)
    # Execute / Assert
    for name in ("defocus_blur", "pixelate", "black_corner"):
        assert corrupt(gray, name, 2, seed=0).shape == (2, 64, 64)
        assert corrupt(rgb, name, 2, seed=0).shape == (1, 128, 128, 3)


def test_brightness_multiplies_intensity_by_medmnist_c_factor_and_clips():
    # Prepare: hand-computed: 100 * 1.1 = 110 (severity 1), 200 * 1.5 = 300 -> 255.
    images = np.array([[[100, 200]]], dtype=np.uint8)
    # Execute / Assert
    assert corrupt(images, "brightness_up", 1, seed=0).tolist() == [[[110, 220]]]
    assert corrupt(images, "brightness_up", 5, seed=0).tolist() == [[[150, 255]]]


def test_bad_name_severity_or_images_raise_one_clear_error():
    images = _batch(28, 1, n=1)
    with pytest.raises(CorruptionError, match="did you mean 'gaussian_noise'"):
        corrupt(images, "gausian_noise", 1, seed=0)
    with pytest.raises(CorruptionError, match="int in 1..5"):
        corrupt(images, "pixelate", 6, seed=0)
    with pytest.raises(CorruptionError, match="uint8"):
        corrupt(images.astype(np.float32), "pixelate", 1, seed=0)
    with pytest.raises(CorruptionError, match="RGB"):
        corrupt(images, "saturate", 1, seed=0)


def test_default_corruptions_follow_medmnist_c_per_modality():
    assert "stain_deposit" in default_corruptions("pathmnist")
    assert "characters" in default_corruptions("dermamnist")
    assert "gamma_corr_up" in default_corruptions("pneumoniamnist")
    assert "saturate" not in default_corruptions("pneumoniamnist", channels=1)
    assert set(default_corruptions("chestmnist")) <= set(list_corruptions())


def test_bubble_draws_medmnist_c_count_and_radius():
    # MedMNIST-C's bubble parameters are (max_radius, max_bubbles): at severity 1,
    # (7, 15) means 7..15 bubbles of radius 3..7 px at 224 px (plus our 0.15 r rim), not
    # 7 bubbles of radius up to 15 px. On a flat image each bubble is one blob of changed
    # pixels (blobs that overlap merge, so the blob count is at most the bubble count).
    from scipy import ndimage

    images = np.full((6, 224, 224), 128, dtype=np.uint8)
    changed = corrupt(images, "bubble", 1, seed=0) != images
    # Execute
    blobs = [ndimage.label(mask)[0] for mask in changed]
    counts = [int(labels.max()) for labels in blobs]
    largest_area = max(np.bincount(labels.ravel())[1:].max() for labels in blobs)
    # Assert: 15 bubbles of radius <= 7 * 1.05 cover at most 15 * pi * 7.35^2 = 2546 px (5%).
    assert changed.mean() < 0.05
    assert all(1 <= count <= 15 for count in counts), counts
    assert np.mean(counts) > 7.5, counts  # more than 7 bubbles drawn on average
    assert largest_area <= 2 * np.pi * (7 * 1.05) ** 2  # one bubble, or two merged, of radius <= 7


def test_dataset_takes_medmnist_c_per_dataset_values():
    # Prepare: a mid-gray image (no clipping at std 0.08: 0.5 / 0.08 > 6 sigma).
    gray = np.full((1, 96, 96), 128, dtype=np.uint8)
    # Execute: MedMNIST-C's pneumoniamnist gaussian_noise at severity 5 is 0.08 (ours 0.26).
    noise = (corrupt(gray, "gaussian_noise", 5, seed=0, dataset="pneumoniamnist").astype(float) - gray) / 255
    # Assert (rounding to uint8 adds std 1 / 255 / sqrt(12) ~ 0.001)
    assert abs(noise.std() - 0.08) < 0.004, noise.std()
    # breastmnist brightness_up severities 1 and 5: 1.4 and 2.0 (ours 1.1 and 1.5).
    pixels = np.array([[[50, 100]]], dtype=np.uint8)
    assert corrupt(pixels, "brightness_up", 1, seed=0, dataset="breastmnist").tolist() == [[[70, 140]]]
    assert corrupt(pixels, "brightness_up", 5, seed=0, dataset="breastmnist").tolist() == [[[100, 200]]]


def test_every_default_corruption_has_medmnist_c_values_for_its_dataset():
    from medfed.sites.corruptions import _DEFAULTS, _MEDMNIST_C

    for flag in _DEFAULTS:  # but characters, which keeps the single table (see the module docstring)
        assert set(_MEDMNIST_C[flag]) == set(default_corruptions(flag)) - {"characters"}, flag


def test_organ_gaussian_blur_uses_the_sigma_of_medmnist_c_kernel_size():
    # organamnist's kernel sizes 11..21 at 224 px; torchvision's sigma of kernel 11 is
    # 0.3 * (5 - 1) + 0.8 = 2.0, of 21: 0.3 * (10 - 1) + 0.8 = 3.5; 28 px halves them.
    from scipy import ndimage

    images = _batch(28, 1, n=1)
    for severity, sigma in ((1, 2.0), (5, 3.5)):
        expected = ndimage.gaussian_filter(images[0] / 255.0, sigma=sigma * 0.5)
        out = corrupt(images, "gaussian_blur", severity, seed=0, dataset="organamnist")
        np.testing.assert_array_equal(out[0], np.clip(np.rint(expected * 255), 0, 255).astype(np.uint8))


def test_without_medmnist_c_values_the_single_table_is_unchanged():
    # Without dataset, for a flag MedMNIST-C does not know, and for a corruption it does
    # not give the dataset (breastmnist has no gaussian_noise): the single table, as
    # computed here from its definitions (the site simulator's federations stay the same).
    from scipy import ndimage

    images = _batch(28, 1, n=2)
    x = images / 255.0

    def uint8(values):
        return np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)

    expected = {
        ("gaussian_noise", 3): uint8(x + np.random.default_rng(7).standard_normal(x.shape) * 0.12),
        ("shot_noise", 4): uint8(np.random.default_rng(7).poisson(x * 10) / 10),
        ("brightness_up", 2): uint8(x * 1.2),
        ("gaussian_blur", 5): uint8(ndimage.gaussian_filter(x, sigma=(0, 1.0, 1.0))),  # 2.0 px at 224, halved
    }
    for (name, severity), want in expected.items():
        for dataset in (None, "mydata"):
            np.testing.assert_array_equal(corrupt(images, name, severity, seed=7, dataset=dataset), want)
        np.testing.assert_array_equal(corrupt(images, name, severity, seed=7), want)
    np.testing.assert_array_equal(corrupt(images, "gaussian_noise", 3, seed=7, dataset="breastmnist"),
                                  expected[("gaussian_noise", 3)])


def test_motion_blur_streaks_as_imagemagicks_within_45_degrees_of_horizontal():
    # MedMNIST-C: MotionBlurImage(radius, sigma, angle in [-45, 45]) has 2*ceil(radius)+1
    # taps; ours stopped the streak at the radius and drew any direction.
    dot = np.zeros((8, 224, 224), dtype=np.uint8)
    dot[:, 112, 112] = 255
    out = corrupt(dot, "motion_blur", 5, seed=3).astype(np.int64)  # radius 20 px, sigma 15 px
    for image in out:
        rows, cols = np.nonzero(image)
        assert cols.max() - cols.min() >= rows.max() - rows.min()  # |angle| <= 45 degrees
        assert max(cols.max() - cols.min(), rows.max() - rows.min()) > 25  # beyond the 20 px radius


def test_rgb_impulse_noise_hits_each_channel_as_skimages_s_and_p():
    gray = np.full((4, 28, 28, 3), 128, dtype=np.uint8)
    out = corrupt(gray, "impulse_noise", 5, seed=0)
    hit = (out != 128).any(axis=-1)
    coloured = hit & (out.min(axis=-1) != out.max(axis=-1))
    assert coloured.sum() > 0.5 * hit.sum()


@pytest.mark.parametrize("name", ["stain_deposit", "bubble"])
def test_artefacts_keep_their_size_relative_to_a_small_image(name):
    # With the blur's floor of 1/2, deposits and bubbles covered most of a 28 px image.
    rng = np.random.default_rng(0)
    covered = {}
    for side in (28, 224):
        images = rng.integers(100, 156, size=(8, side, side, 3), dtype=np.uint8)
        out = corrupt(images, name, 5, seed=1)
        covered[side] = float(np.mean(np.abs(out.astype(int) - images).max(axis=-1) > 8))
    assert covered[28] < 0.35 and covered[28] < 3 * covered[224]


def _contrast_settings():
    """Every (name, dataset, severity, factor) corrupt() uses for contrast: the single table and MedMNIST-C's."""
    from medfed.sites.corruptions import _MEDMNIST_C, _REGISTRY

    for name in ("contrast_up", "contrast_down"):
        for dataset in [None, *(flag for flag, table in _MEDMNIST_C.items() if name in table)]:
            factors = _MEDMNIST_C[dataset][name] if dataset else _REGISTRY[name].params
            for severity, factor in enumerate(factors, start=1):
                yield name, dataset, severity, factor


def test_contrast_matches_pil_image_enhance_as_medmnist_c_within_one_level():
    # MedMNIST-C's contrast is PIL's ImageEnhance.Contrast: a blend with the mean of the
    # image's luminance (L). Coloured images whose channels differ (pink, as pathology)
    # tell that mean from the plain mean over R, G and B (up to ~12 levels off before).
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(0)
    low = rng.integers(0, 150, size=(6, 1, 1, 3))
    rgb = (low + rng.integers(0, 100, size=(6, 28, 24, 3))).astype(np.uint8)
    gray = _batch(28, 1, n=2)
    settings = list(_contrast_settings())
    assert {factor for *_, factor in settings} >= {0.15, 0.4, 0.9, 1.1, 1.6, 1.8}
    for name, dataset, severity, factor in settings:
        for images in (rgb, gray):
            ours = corrupt(images, name, severity, seed=0, dataset=dataset).astype(int)
            pil = np.stack([np.asarray(ImageEnhance.Contrast(Image.fromarray(im)).enhance(factor)) for im in images])
            assert np.abs(ours - pil).max() <= 1, (name, dataset, severity, images.shape)


@pytest.mark.parametrize(("name", "channels"), list(_cases()))
def test_output_does_not_depend_on_the_chunks_of_images(name, channels, monkeypatch):
    # corrupt() works on chunks of images; every random draw is the batch's, so one image
    # per chunk gives the output of one chunk for the batch, bit for bit.
    from medfed.sites import corruptions

    images = _batch(28, channels, n=5)
    outputs = {}
    for values in (1, 2 * 28 * 28 * 3 + 1, 10**9):
        monkeypatch.setattr(corruptions, "_CHUNK_VALUES", values)
        outputs[values] = corrupt(images, name, 4, seed=11)
    for values, output in outputs.items():
        np.testing.assert_array_equal(output, outputs[10**9], err_msg=f"{values} values per chunk")


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "shot_noise", "contrast_up", "motion_blur", "bubble"])
def test_peak_memory_stays_near_the_input_size_not_a_float64_copy_of_the_batch(name):
    # A whole float64 batch and its temporaries peaked at 32-42x the uint8 input (24 MB here;
    # ~770 MB for 500 gray images at 224 px); chunks of images keep it near the output's size.
    import tracemalloc

    images = np.random.default_rng(0).integers(0, 256, size=(64, 64, 64, 3), dtype=np.uint8)  # 0.75 MB
    corrupt(images[:1], name, 3, seed=0)  # imports and caches outside the measure
    tracemalloc.start()
    try:
        corrupt(images, name, 3, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{name}: peak {peak / 2**20:.1f} MB"


def test_impulse_noise_draws_hits_then_salts_each_for_the_whole_batch():
    # Chunks draw the salts from a copy of the generator advanced past the batch's hits:
    # the values of two whole-batch draws, one after the other, as before chunking.
    from medfed.sites import corruptions

    images = _batch(64, 3, n=40)  # several chunks
    amount = corruptions._REGISTRY["impulse_noise"].params[2]
    rng = np.random.default_rng(5)
    hit = rng.uniform(size=images.shape) < amount
    salt = rng.uniform(size=images.shape) < 0.5
    expected = np.where(hit, np.where(salt, 255, 0), images)
    assert len(images) > corruptions._CHUNK_VALUES // images[0].size
    np.testing.assert_array_equal(corrupt(images, "impulse_noise", 3, seed=5), expected)
