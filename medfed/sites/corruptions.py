"""Image corruptions in the families of MedMNIST-C: a site's scanner, protocol and artefacts.

MedMNIST-C (Di Salvo, Doerrich and Ledig, "MedMNIST-C: Comprehensive benchmark and
improved classifier robustness by simulating realistic image corruptions",
arXiv:2406.17536) corrupts the MedMNIST+ test sets with task- and modality-specific
corruptions at five severities. Its package needs ImageMagick and pins old versions, so
the families are implemented here on NumPy, SciPy, scikit-image and Pillow:

=========== ==========================================================================
family      corruptions (severity parameters for severities 1..5)
=========== ==========================================================================
digital     ``pixelate`` (side kept, as a fraction of the image side), ``jpeg_compression``
            (JPEG quality)
noise       ``gaussian_noise`` (std), ``speckle_noise`` (std of the multiplicative
            noise), ``impulse_noise`` (salt-and-pepper fraction), ``shot_noise``
            (photons per unit intensity; fewer is noisier)
blur        ``defocus_blur`` (disk radius px, alias blur sigma), ``motion_blur``
            (length px, sigma px), ``gaussian_blur`` (sigma px), ``zoom_blur``
            (largest zoom factor)
colour      ``brightness_up``/``brightness_down`` (intensity factor),
            ``contrast_up``/``contrast_down`` (factor on the distance to the image's
            mean luminance), ``gamma_corr_up``/``gamma_corr_down`` (exponent on intensity in
            [0, 1]), ``saturate`` (added HSV saturation; RGB only)
artefacts   ``stain_deposit`` (number of deposits; pathology), ``bubble`` (largest
            radius px, largest number; pathology), ``black_corner`` (radius of the dermatoscope's
            field of view, as a fraction of the half diagonal), ``characters``
            (number of printed characters; dermatoscopy)
=========== ==========================================================================

Which parameters follow MedMNIST-C: with ``corrupt(..., dataset=flag)`` for a MedMNIST
2D flag (``"pneumoniamnist"``, ``"dermamnist"``, ...), a corruption that MedMNIST-C's
registry gives for that dataset takes its five per-dataset values (``_MEDMNIST_C``,
copied from medmnistc/corruptions/registry.py at commit 8acfd27); ``medfed evaluate``
(:mod:`medfed.robustness`) passes its dataset, so it measures robustness at MedMNIST-C's
severities. Without ``dataset`` (or for another flag, or a corruption MedMNIST-C does not
give for the dataset) every dataset uses one table: the intensity parameters (noise
levels, JPEG qualities, pixelation fractions, brightness, contrast and gamma factors,
saturation shifts, zoom factors) take the values MedMNIST-C's registry gives its gray
modalities (chest X-ray) and, for colour and artefact corruptions, pathology and
dermatoscopy. The site simulator (:mod:`medfed.sites.profiles`) uses this table.
Intensity parameters do not depend on the image size. Spatial parameters are
MedMNIST-C's values in pixels at 224 px. Blur radii and sigmas are, in both tables,
scaled by ``max(side / 224, 1/2)``: a 28 px image gets the blur of a 112 px one rather
than of a true 8x downsampling, which would leave it nearly untouched; pixelation keeps
``fraction ** scale`` of the side for the same reason. Bubble and deposit sizes are
scaled by ``side / 224`` (at least 1 px): with the blur's floor they covered most of a
28 px image. In the single
table motion blur's first severity uses sigma 3 instead of MedMNIST-C's 5, which its
second severity repeats. Motion blur draws its direction, artefacts their positions,
from the seed; the shapes of the stain deposits, bubbles and characters are our own
simple renderings, not MedMNIST-C's images.

Where a per-dataset value is converted, the match is not exact: ``gaussian_blur`` takes
the sigma torchvision derives from MedMNIST-C's kernel size, but scipy's kernel reaches
4 sigma where torchvision's stops at the kernel's edge (1.25 to 2.9 sigma), so the tails
weigh a little more here; ``black_corner``'s multiple of the half side becomes a
fraction of the half diagonal (exact for square images, but our edge is soft over an
eighth of the radius where MedMNIST-C's is hard; dermamnist's severity 4 darkens more
than 5, as in MedMNIST-C); ``characters`` keeps the single table (1 to 6 characters
in a font of a fifth of the side) for every dataset: MedMNIST-C's many small OpenCV
letters have no faithful rendering at 28 px here. ``stain_deposit`` prints the given number of deposits
where MedMNIST-C draws between 1 and that number and enlarges its inks with the
severity, so bloodmnist's severities 3..5 (3, 3, 3) coincide here. Some of MedMNIST-C's
per-dataset values are not monotone in the severity (octmnist ``defocus_blur``'s
aliasing sigma, dermamnist ``black_corner``): they are kept as they are.
``contrast_up``/``contrast_down`` match the PIL ``ImageEnhance.Contrast`` that MedMNIST-C
uses within 1 level, not exactly: PIL rounds a gray image's mean to a whole level (kept
unrounded here; an RGB image's mean luminance is rounded as PIL does) and truncates
its blend where the output here is rounded.

The random draws of one call are made so that a higher severity adds to a lower one
(the same noise field scaled up, the same first artefacts plus more): with a fixed seed
the change grows with the severity (in the single table; see above for the per-dataset
values that do not grow).

Public API: :func:`list_corruptions`, :func:`corrupt`, :func:`default_corruptions`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medfed.errors import MedfedError

__all__ = [
    "CORRUPTION_FAMILIES",
    "CorruptionError",
    "corrupt",
    "default_corruptions",
    "list_corruptions",
    "parameter_source",
]

SEVERITIES = (1, 2, 3, 4, 5)
_CHUNK_VALUES = 1 << 17  # values (pixels x channels) per chunk of images in corrupt(); one image at least


class CorruptionError(MedfedError):
    """A corruption name, severity or image array is not valid."""


@dataclass(frozen=True)
class _Corruption:
    """``draw(rng, shape, param)`` makes a call's random draws for the whole batch ``shape``
    at once: a tuple of arrays of one row per image, sliced per chunk of images, and of
    generators, passed as they are to the chunks in order (noise fields, drawn chunk by
    chunk). ``apply(x, param, draws, scale)`` corrupts one chunk ``x`` with its draws."""

    family: str
    params: tuple  # one entry per severity 1..5
    apply: Callable[[np.ndarray, object, tuple, float], np.ndarray]
    rgb_only: bool = False
    draw: Callable[[np.random.Generator, tuple[int, ...], object], tuple] | None = None


_REGISTRY: dict[str, _Corruption] = {}


def _register(name: str, family: str, params: tuple, *, rgb_only: bool = False, draw=None):
    def decorator(function):
        if len(params) != len(SEVERITIES):
            raise AssertionError(f"{name} needs one parameter per severity")
        _REGISTRY[name] = _Corruption(family, tuple(params), function, rgb_only, draw)
        return function

    return decorator


# ----------------------------------------------------------------------------------
# Helpers. Images inside the functions are float64 [N, H, W, C] in [0, 1]: a chunk of
# consecutive images of the batch (see corrupt()).
# ----------------------------------------------------------------------------------
def _spatial_scale(side: int) -> float:
    return max(side / 224.0, 0.5)


def _artefact_scale(height: int, width: int) -> float:
    """Artefacts (deposits, bubbles) keep their size relative to the image: blur's floor of
    1/2 would make them cover most of a 28 px image (callers keep a 1 px minimum)."""
    return min(height, width) / 224.0


def _per_image(images: np.ndarray, function: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    return np.stack([function(image, index) for index, image in enumerate(images)])


def _filter_channels(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.stack([ndimage.convolve(image[..., c], kernel, mode="reflect") for c in range(image.shape[-1])], -1)


def _to_pil(image: np.ndarray):
    from PIL import Image

    array = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _from_pil(picture, channels: int) -> np.ndarray:
    array = np.asarray(picture, dtype=np.float64) / 255.0
    return array[..., None] if channels == 1 and array.ndim == 2 else array


def _positions(rng: np.random.Generator, count: int, n: int, height: int, width: int) -> np.ndarray:
    """``[n, count, 2]`` (row, column) centres: the first ones are shared by every severity."""
    return rng.uniform(0, 1, size=(n, count, 2)) * np.array([height, width])


# ----------------------------------------------------------------------------------
# digital
# ----------------------------------------------------------------------------------
@_register("pixelate", "digital", (0.30, 0.25, 0.20, 0.15, 0.10))
def _pixelate(x, fraction, draws, scale):
    from PIL import Image

    # The kept fraction is raised to the spatial scale: at 224 px MedMNIST-C's value,
    # at 28 px its square root (0.30 -> 0.55 of the side), or small images turn to blocks.
    fraction = fraction ** scale
    height, width = x.shape[1:3]
    small = (max(1, round(width * fraction)), max(1, round(height * fraction)))
    return _per_image(x, lambda im, _: _from_pil(
        _to_pil(im).resize(small, Image.Resampling.BOX).resize((width, height), Image.Resampling.NEAREST), im.shape[-1]))


@_register("jpeg_compression", "digital", (50, 30, 15, 10, 7))
def _jpeg(x, quality, draws, scale):
    from PIL import Image

    def one(im, _):
        buffer = io.BytesIO()
        _to_pil(im).save(buffer, format="JPEG", quality=int(quality))
        return _from_pil(Image.open(io.BytesIO(buffer.getvalue())), im.shape[-1])

    return _per_image(x, one)


# ----------------------------------------------------------------------------------
# noise (std in intensity units: independent of the image size)
# ----------------------------------------------------------------------------------
def _noise_stream(rng, shape, param):
    # A noise field is drawn chunk by chunk, in order: the generator fills the values one
    # after the other, so the chunks' draws are those of one draw for the whole batch.
    return (rng,)


@_register("gaussian_noise", "noise", (0.04, 0.08, 0.12, 0.18, 0.26), draw=_noise_stream)
def _gaussian_noise(x, std, draws, scale):
    return x + draws[0].standard_normal(x.shape) * std


@_register("speckle_noise", "noise", (0.05, 0.15, 0.20, 0.35, 0.45), draw=_noise_stream)
def _speckle_noise(x, std, draws, scale):
    return x + x * draws[0].standard_normal(x.shape) * std


def _impulse_streams(rng, shape, param):
    # The whole batch's hit values, then its salt values: the salt stream is a copy of the
    # generator advanced past the hit values (one 64-bit draw per uniform double), so both
    # can be drawn chunk by chunk.
    salt = type(rng.bit_generator)()
    salt.state = rng.bit_generator.state
    salt.advance(int(np.prod(shape)))
    return (rng, np.random.Generator(salt))


@_register("impulse_noise", "noise", (0.01, 0.03, 0.06, 0.09, 0.17), draw=_impulse_streams)
def _impulse_noise(x, amount, draws, scale):
    # One uniform draw per pixel and channel (as skimage's "s&p", which MedMNIST-C uses:
    # colour images get coloured specks): the values hit at a lower amount are hit at a higher one.
    hits, salts = draws
    u = hits.uniform(size=x.shape)
    salt = salts.uniform(size=x.shape) < 0.5
    hit = u < amount
    return np.where(hit, np.where(salt, 1.0, 0.0), x)


@_register("shot_noise", "noise", (60, 25, 18, 10, 5), draw=_noise_stream)
def _shot_noise(x, photons, draws, scale):
    return draws[0].poisson(np.clip(x, 0, 1) * photons) / photons


# ----------------------------------------------------------------------------------
# blur (spatial: pixels at 224 px, times the spatial scale)
# ----------------------------------------------------------------------------------
def _disk(radius: float) -> np.ndarray:
    """A normalised disk kernel; edge pixels weighted by the area the disk covers
    (8 x 8 sub-samples), so the blur grows smoothly with a fractional radius."""
    reach = max(1, int(np.ceil(radius)))
    offsets = (np.arange(8) + 0.5) / 8 - 0.5
    yy, xx = np.mgrid[-reach:reach + 1, -reach:reach + 1].astype(np.float64)
    sub_y = yy[..., None, None] + offsets[:, None]
    sub_x = xx[..., None, None] + offsets[None, :]
    kernel = ((sub_x**2 + sub_y**2) <= max(radius, 0.5) ** 2).mean(axis=(-2, -1))
    return kernel / kernel.sum()


@_register("defocus_blur", "blur", ((4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5)))
def _defocus_blur(x, params, draws, scale):
    from scipy import ndimage

    radius, alias = params
    kernel = _disk(radius * scale)
    blurred = _per_image(x, lambda im, _: _filter_channels(im, kernel))
    return ndimage.gaussian_filter(blurred, sigma=(0, alias * scale, alias * scale, 0))


def _motion_angles(rng, shape, params):
    return (rng.uniform(-np.pi / 4, np.pi / 4, size=shape[0]),)


@_register("motion_blur", "blur", ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)), draw=_motion_angles)
def _motion_blur(x, params, draws, scale):
    # MedMNIST-C calls ImageMagick's MotionBlurImage(radius, sigma, angle), angle uniform
    # in [-45, 45] degrees: a one-sided streak (a camera or patient moving) of
    # 2 * ceil(radius) + 1 taps from the centre, Gaussian weights of the distance.
    radius, sigma = params[0] * scale, params[1] * scale
    (angles,) = draws
    reach = 2 * max(1, int(np.ceil(radius)))

    def one(im, index):
        # Gaussian weights of the distance along the streak, summed per pixel offset; the
        # image is then a weighted sum of its shifted copies, one per offset (a dense
        # convolution over the streak's square box cost ~10x more at 224 px).
        taps: dict[tuple[int, int], float] = {}
        for step in np.linspace(0, reach, num=2 * reach + 1):
            offset = (int(round(step * np.sin(angles[index]))), int(round(step * np.cos(angles[index]))))
            taps[offset] = taps.get(offset, 0.0) + float(np.exp(-0.5 * (step / max(sigma, 1e-6)) ** 2))
        total = sum(taps.values())
        height, width = im.shape[:2]
        padded = np.pad(im, ((reach, reach), (reach, reach), (0, 0)), mode="symmetric")  # scipy's "reflect"
        out = np.zeros_like(im)
        for (dy, dx), weight in taps.items():
            # Convolution: the output at p takes the input at p - offset.
            out += (weight / total) * padded[reach - dy:reach - dy + height, reach - dx:reach - dx + width]
        return out

    return _per_image(x, one)


@_register("gaussian_blur", "blur", (0.8, 1.1, 1.4, 1.7, 2.0))
def _gaussian_blur(x, sigma, draws, scale):
    # MedMNIST-C gives torchvision kernel sizes 3..11 at 224 px; these are the sigmas
    # torchvision derives from them (0.3 * ((k - 1) / 2 - 1) + 0.8).
    from scipy import ndimage

    return ndimage.gaussian_filter(x, sigma=(0, sigma * scale, sigma * scale, 0))


@_register("zoom_blur", "blur", (1.11, 1.16, 1.21, 1.26, 1.31))
def _zoom_blur(x, largest, draws, scale):
    # ``largest``: the zoom factors are 1.01, 1.02, .. below it; or a tuple, the factors
    # themselves (MedMNIST-C's per-dataset values, see _MEDMNIST_C).
    from scipy import ndimage

    height, width = x.shape[1:3]
    factors = np.asarray(largest, dtype=np.float64) if isinstance(largest, tuple) else np.arange(1.01, largest, 0.01)

    def zoomed(im, factor):
        big = ndimage.zoom(im, (factor, factor, 1), order=1)
        top, left = (big.shape[0] - height) // 2, (big.shape[1] - width) // 2
        return big[top:top + height, left:left + width]

    return _per_image(x, lambda im, _: (im + sum(zoomed(im, f) for f in factors)) / (len(factors) + 1))


# ----------------------------------------------------------------------------------
# colour and exposure
# ----------------------------------------------------------------------------------
@_register("brightness_up", "colour", (1.1, 1.2, 1.3, 1.4, 1.5))
@_register("brightness_down", "colour", (0.9, 0.8, 0.7, 0.6, 0.5))
def _brightness(x, factor, draws, scale):
    return x * factor


@_register("contrast_up", "colour", (1.1, 1.2, 1.3, 1.4, 1.6))
@_register("contrast_down", "colour", (0.9, 0.8, 0.7, 0.6, 0.4))
def _contrast(x, factor, draws, scale):
    # MedMNIST-C's PIL ImageEnhance.Contrast blends with a gray image of the mean
    # luminance: PIL's L conversion of each pixel ((19595 R + 38470 G + 7471 B + 2**15) >> 16,
    # 0.299 R + 0.587 G + 0.114 B rounded) averaged and rounded to a whole level. (The plain
    # mean over R, G and B differed by up to ~12 levels on pink pathology images.) Gray
    # images keep their unrounded mean, within 1 level of PIL's.
    if x.shape[-1] == 3:
        levels = np.rint(x * 255.0).astype(np.int64)
        luminance = (levels @ np.array([19595, 38470, 7471], dtype=np.int64) + 0x8000) >> 16
        mean = np.floor(luminance.mean(axis=(1, 2)) + 0.5)[:, None, None, None] / 255.0
    else:
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return mean + (x - mean) * factor


@_register("gamma_corr_up", "colour", (1.1, 1.2, 1.3, 1.4, 1.6))
@_register("gamma_corr_down", "colour", (0.9, 0.8, 0.7, 0.6, 0.4))
def _gamma(x, gamma, draws, scale):
    return np.clip(x, 0, 1) ** gamma


@_register("saturate", "colour", (0.05, 0.10, 0.15, 0.20, 0.25), rgb_only=True)
def _saturate(x, shift, draws, scale):
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(np.clip(x, 0, 1))
    hsv[..., 1] = np.clip(hsv[..., 1] + shift, 0, 1)
    return hsv2rgb(hsv)


# ----------------------------------------------------------------------------------
# modality artefacts
# ----------------------------------------------------------------------------------
_MAX_COUNT = 25  # artefact positions drawn per image, shared by all severities


def _stain_draws(rng, shape, count):
    n, height, width, _ = shape
    centres = _positions(rng, _MAX_COUNT, n, height, width)
    radii = np.maximum(rng.uniform(6, 14, size=(n, _MAX_COUNT)) * 2 * _artefact_scale(height, width), 1.0)
    return centres, radii


@_register("stain_deposit", "artefact", (1, 2, 3, 4, 5), draw=_stain_draws)
def _stain_deposit(x, count, draws, scale):
    n, height, width, channels = x.shape
    centres, radii = draws
    # Haematoxylin-like dark purple; gray images get its luminance.
    stain = np.array([0.35, 0.15, 0.45]) if channels == 3 else np.array([0.25])
    yy, xx = np.mgrid[0:height, 0:width]
    out = x.copy()
    for i in range(n):
        for k in range(int(count)):
            distance = np.hypot(yy - centres[i, k, 0], xx - centres[i, k, 1]) / max(radii[i, k], 0.5)
            alpha = np.clip(1.2 - distance, 0, 1)[..., None] * 0.85  # soft edge
            out[i] = out[i] * (1 - alpha) + stain * alpha
    return out


def _bubble_draws(rng, shape, params):
    n, height, width, _ = shape
    centres = _positions(rng, _MAX_COUNT, n, height, width)
    sizes = rng.uniform(0.0, 1.0, size=(n, _MAX_COUNT))
    counts = 7 + np.floor(rng.uniform(0.0, 1.0, size=n) * (int(params[1]) - 6)).astype(int)
    return centres, sizes, counts


@_register("bubble", "artefact", ((7, 15), (10, 15), (12, 15), (15, 20), (17, 25)), draw=_bubble_draws)
def _bubble(x, params, draws, scale):
    # MedMNIST-C's (max_radius, max_bubbles) (medmnistc/corruptions/microscopy.py,
    # Bubble.apply): randint(7, max_bubbles) bubbles, each of radius randint(3, max_radius)
    # px at 224 px (here a radius uniform in [3, max_radius], not only whole pixels). One
    # uniform draw per image sets the count and one per bubble its radius, so a higher
    # severity keeps the bubbles of a lower one, grown, plus more.
    max_radius, max_bubbles = params
    n, height, width, _ = x.shape
    centres, sizes, counts = draws
    yy, xx = np.mgrid[0:height, 0:width]
    out = x.copy()
    for i in range(n):
        for k in range(min(int(counts[i]), _MAX_COUNT)):
            r = max((3 + (max_radius - 3) * sizes[i, k]) * _artefact_scale(height, width), 1.0)
            distance = np.hypot(yy - centres[i, k, 0], xx - centres[i, k, 1]) / r
            inside = (distance < 1.0)[..., None]
            rim = np.clip(1.0 - np.abs(distance - 0.9) / 0.15, 0, 1)[..., None]
            # A bubble lightens what it covers and has a dark rim.
            out[i] = np.where(inside, 0.6 * out[i] + 0.4, out[i]) * (1 - 0.6 * rim)
    return out


@_register("black_corner", "artefact", (0.95, 0.88, 0.80, 0.72, 0.64))
def _black_corner(x, radius, draws, scale):
    # The dermatoscope's round field of view: black outside a circle whose radius is a
    # fraction of the half diagonal, with a soft edge. (MedMNIST-C's factors are not
    # monotone in the severity; these are.)
    _, height, width, _ = x.shape
    yy, xx = np.mgrid[0:height, 0:width]
    distance = np.hypot(yy - (height - 1) / 2, xx - (width - 1) / 2) / (radius * np.hypot(height, width) / 2)
    keep = np.clip((1.0 - distance) * 8 + 1, 0, 1)[None, ..., None]
    return x * keep


def _character_draws(rng, shape, count):
    n, height, width, _ = shape
    symbols = rng.choice(list("ABCDEFGHKLMNPRSTUVXYZ0123456789"), size=(n, _MAX_COUNT))
    centres = _positions(rng, _MAX_COUNT, n, height, width) * 0.8
    shades = rng.choice([0, 255], size=(n, _MAX_COUNT))
    return symbols, centres, shades


@_register("characters", "artefact", (1, 2, 3, 4, 6), draw=_character_draws)
def _characters(x, count, draws, scale):
    from PIL import ImageDraw, ImageFont

    n, height, width, channels = x.shape
    font = ImageFont.load_default(size=max(6, int(round(height / 5))))
    symbols, centres, shades = draws

    def one(im, i):
        picture = _to_pil(im)
        draw = ImageDraw.Draw(picture)
        for k in range(int(count)):
            fill = int(shades[i, k]) if channels == 1 else (int(shades[i, k]),) * 3
            draw.text((float(centres[i, k, 1]), float(centres[i, k, 0])), str(symbols[i, k]), fill=fill, font=font)
        return _from_pil(picture, channels)

    return _per_image(x, one)


#: Family of every corruption, in the order of :func:`list_corruptions`.
CORRUPTION_FAMILIES: dict[str, str] = {name: spec.family for name, spec in sorted(_REGISTRY.items())}

# MedMNIST-C's choice of corruptions per dataset (its registry), by modality.
_GRAY_RADIOLOGY = (
    "pixelate", "jpeg_compression", "gaussian_noise", "speckle_noise", "impulse_noise", "shot_noise",
    "gaussian_blur", "brightness_up", "brightness_down", "contrast_up", "contrast_down",
    "gamma_corr_up", "gamma_corr_down",
)
_MICROSCOPY = (
    "pixelate", "jpeg_compression", "defocus_blur", "motion_blur", "brightness_up", "brightness_down",
    "contrast_up", "contrast_down", "saturate", "stain_deposit", "bubble",
)
_DEFAULTS: dict[str, tuple[str, ...]] = {
    "chestmnist": _GRAY_RADIOLOGY,
    "pneumoniamnist": _GRAY_RADIOLOGY,
    "organamnist": _GRAY_RADIOLOGY,
    "organcmnist": _GRAY_RADIOLOGY,
    "organsmnist": _GRAY_RADIOLOGY,
    "breastmnist": ("pixelate", "jpeg_compression", "speckle_noise", "motion_blur", "brightness_up",
                    "brightness_down", "contrast_down"),
    "retinamnist": ("pixelate", "jpeg_compression", "gaussian_noise", "speckle_noise", "defocus_blur",
                    "motion_blur", "brightness_down", "contrast_down"),
    "pathmnist": _MICROSCOPY,
    "bloodmnist": _MICROSCOPY,
    "dermamnist": ("pixelate", "jpeg_compression", "gaussian_noise", "speckle_noise", "impulse_noise",
                   "shot_noise", "defocus_blur", "motion_blur", "zoom_blur", "brightness_up", "brightness_down",
                   "contrast_up", "contrast_down", "black_corner", "characters"),
    "tissuemnist": ("pixelate", "jpeg_compression", "impulse_noise", "gaussian_blur", "brightness_up",
                    "brightness_down", "contrast_up", "contrast_down"),
    "octmnist": ("pixelate", "jpeg_compression", "speckle_noise", "defocus_blur", "motion_blur", "contrast_down"),
}


# ----------------------------------------------------------------------------------
# MedMNIST-C's per-dataset severity parameters, used by corrupt(..., dataset=flag).
# Source: francescodisalvo05/medmnistc-api, medmnistc/corruptions/registry.py
# (CORRUPTIONS_DS), commit 8acfd2710c6e0e8b2745be8b1fa1c17b94b8f8a7. Values are copied as
# MedMNIST-C writes them, except where its parameter means something else than ours:
#   gaussian_blur  MedMNIST-C gives torchvision kernel sizes k; the sigma torchvision
#                  derives from k is 0.3 * ((k - 1) / 2 - 1) + 0.8 (_kernel_sigmas).
#   zoom_blur      MedMNIST-C gives the zoom factors, np.arange(1, stop, step); the
#                  same arrays are passed as tuples (_zoom_factors).
#   black_corner   MedMNIST-C's radius is a multiple of the half side (the inscribed
#                  circle); ours is a fraction of the half diagonal, so m / sqrt(2).
#   characters     not taken: MedMNIST-C prints up to 6-10 words in a small OpenCV font
#                  (scale 0.14-0.18); as many letters in our font of a fifth of the side
#                  covered 7-26 % of a 28 px image, far more than MedMNIST-C's text. The
#                  single table's 1-6 characters are used for every dataset.
# Lists of six values in MedMNIST-C (chest/pneumonia gaussian_blur, retina
# defocus_blur) keep their first five: severities 1..5 index only those.
# ----------------------------------------------------------------------------------
def _kernel_sigmas(*kernels: int) -> tuple[float, ...]:
    return tuple(round(0.3 * ((k - 1) / 2 - 1) + 0.8, 4) for k in kernels)


def _zoom_factors(*aranges: tuple[float, float, float]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(f) for f in np.arange(*a)) for a in aranges)


def _corner_fractions(*multiples: float) -> tuple[float, ...]:
    return tuple(float(m / np.sqrt(2.0)) for m in multiples)


_GRAY_ENHANCE = {
    "brightness_up": (1.1, 1.2, 1.3, 1.4, 1.5),
    "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
    "contrast_up": (1.1, 1.2, 1.3, 1.4, 1.6),
    "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4),
    "gamma_corr_up": (1.1, 1.2, 1.3, 1.4, 1.6),
    "gamma_corr_down": (0.9, 0.8, 0.7, 0.6, 0.4),
}
_ORGAN = {
    "pixelate": (0.7, 0.6, 0.5, 0.40, 0.35),
    "jpeg_compression": (50, 30, 15, 10, 7),
    "gaussian_noise": (0.04, 0.08, 0.12, 0.16, 0.20),
    "speckle_noise": (0.05, 0.10, 0.20, 0.30, 0.40),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.08),
    "shot_noise": (200, 100, 50, 25, 15),
    "gaussian_blur": _kernel_sigmas(11, 13, 15, 17, 21),
    "brightness_up": (1.2, 1.3, 1.4, 1.5, 1.6),
    "brightness_down": (0.8, 0.75, 0.7, 0.65, 0.60),
    "contrast_up": (1.3, 1.4, 1.6, 1.7, 1.8),
    "contrast_down": (0.8, 0.7, 0.6, 0.55, 0.5),
    "gamma_corr_up": (1.3, 1.4, 1.6, 1.8, 2.0),
    "gamma_corr_down": (0.9, 0.8, 0.7, 0.6, 0.4),
}
_MEDMNIST_C: dict[str, dict[str, tuple]] = {
    "pathmnist": {
        "pixelate": (0.8, 0.6, 0.40, 0.30, 0.25),
        "jpeg_compression": (50, 30, 15, 10, 7),
        "defocus_blur": ((3, 0.1), (4, 0.1), (5, 0.2), (6, 0.2), (7, 0.3)),
        "motion_blur": ((5, 5), (10, 5), (15, 5), (15, 8), (15, 12)),
        "brightness_up": (1.1, 1.15, 1.2, 1.22, 1.25),
        "brightness_down": (0.85, 0.80, 0.75, 0.72, 0.70),
        "contrast_up": (1.1, 1.2, 1.3, 1.4, 1.6),
        "contrast_down": (0.8, 0.7, 0.6, 0.55, 0.5),
        "saturate": (0.05, 0.10, 0.15, 0.20, 0.25),
        "stain_deposit": (1, 2, 3, 4, 5),
        "bubble": ((7, 15), (10, 15), (12, 15), (15, 20), (17, 25)),
    },
    "bloodmnist": {
        "pixelate": (0.6, 0.5, 0.40, 0.30, 0.25),
        "jpeg_compression": (50, 30, 15, 10, 7),
        "defocus_blur": ((2, 0.01), (3, 0.1), (4, 0.1), (5, 0.1), (6, 0.1)),
        "motion_blur": ((3, 3), (5, 5), (10, 5), (10, 7), (10, 9)),
        "brightness_up": (1.1, 1.2, 1.3, 1.35, 1.4),
        "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
        "contrast_up": (1.1, 1.15, 1.2, 1.25, 1.3),
        "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.5),
        "saturate": (0.05, 0.10, 0.15, 0.17, 0.20),
        "stain_deposit": (1, 2, 3, 3, 3),
        "bubble": ((5, 10), (7, 10), (10, 10), (12, 12), (15, 12)),
    },
    "dermamnist": {
        "pixelate": (0.7, 0.5, 0.40, 0.30, 0.25),
        "jpeg_compression": (30, 20, 15, 10, 7),
        "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),
        "speckle_noise": (0.05, 0.15, 0.2, 0.35, 0.45),
        "impulse_noise": (0.01, 0.03, 0.06, 0.09, 0.17),
        "shot_noise": (60, 25, 18, 10, 5),
        "defocus_blur": ((4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5)),
        "motion_blur": ((10, 5), (15, 5), (15, 8), (15, 12), (20, 15)),
        "zoom_blur": _zoom_factors((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02),
                                   (1, 1.31, 0.03)),
        "brightness_up": (1.1, 1.2, 1.3, 1.4, 1.5),
        "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
        "contrast_up": (1.1, 1.2, 1.3, 1.4, 1.6),
        "contrast_down": (0.8, 0.7, 0.6, 0.5, 0.4),
        "black_corner": _corner_fractions(1.10, 1.05, 1.00, 0.90, 0.95),
    },
    "retinamnist": {
        "pixelate": (0.8, 0.60, 0.50, 0.40, 0.35),
        "jpeg_compression": (30, 25, 20, 10, 5),
        "gaussian_noise": (0.04, 0.08, 0.12, 0.16, 0.20),
        "speckle_noise": (0.10, 0.15, 0.20, 0.25, 0.30),
        "defocus_blur": ((4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5)),  # sixth (9, 0.6) unused
        "motion_blur": ((8, 5), (15, 5), (15, 8), (15, 12), (20, 15)),
        "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
        "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4),
    },
    "tissuemnist": {
        "pixelate": (0.40, 0.30, 0.20, 0.15, 0.10),
        "jpeg_compression": (25, 20, 15, 10, 7),
        "impulse_noise": (0.01, 0.015, 0.02, 0.025, 0.03),
        "gaussian_blur": _kernel_sigmas(13, 15, 17, 21, 25),
        "brightness_up": (1.3, 1.4, 1.5, 1.6, 1.7),
        "brightness_down": (0.8, 0.7, 0.6, 0.5, 0.4),
        "contrast_up": (1.1, 1.2, 1.3, 1.4, 1.6),
        "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4),
    },
    "octmnist": {
        "pixelate": (0.30, 0.25, 0.20, 0.15, 0.10),
        "jpeg_compression": (30, 15, 10, 7, 5),
        "speckle_noise": (0.15, 0.30, 0.40, 0.50, 0.60),
        "defocus_blur": ((0.5, 0.6), (1, 0.5), (1.5, 0.1), (2.0, 0.5), (2.5, 0.1)),
        "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        "contrast_down": (0.6, 0.4, 0.3, 0.2, 0.15),
    },
    "breastmnist": {
        "pixelate": (0.30, 0.25, 0.20, 0.15, 0.10),
        "jpeg_compression": (50, 30, 15, 10, 7),
        "speckle_noise": (0.10, 0.15, 0.20, 0.25, 0.30),
        "motion_blur": ((5, 5), (9, 7), (9, 10), (13, 10), (17, 12)),
        "brightness_up": (1.4, 1.5, 1.6, 1.8, 2.0),
        "brightness_down": (0.55, 0.5, 0.45, 0.4, 0.3),
        "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4),
    },
    "chestmnist": {
        "pixelate": (0.30, 0.25, 0.20, 0.15, 0.10),
        "jpeg_compression": (50, 30, 15, 10, 7),
        "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),
        "speckle_noise": (0.05, 0.15, 0.2, 0.35, 0.45),
        "impulse_noise": (0.01, 0.03, 0.06, 0.09, 0.17),
        "shot_noise": (60, 25, 18, 10, 5),
        "gaussian_blur": _kernel_sigmas(3, 5, 7, 9, 11),  # sixth kernel 13 unused
        **_GRAY_ENHANCE,
    },
    "pneumoniamnist": {
        "pixelate": (0.8, 0.7, 0.6, 0.5, 0.40),
        "jpeg_compression": (50, 30, 15, 10, 7),
        "gaussian_noise": (0.04, 0.05, 0.06, 0.07, 0.08),
        "speckle_noise": (0.05, 0.07, 0.10, 0.15, 0.20),
        "impulse_noise": (0.005, 0.01, 0.013, 0.017, 0.02),
        "shot_noise": (300, 200, 150, 100, 80),
        "gaussian_blur": _kernel_sigmas(3, 5, 7, 9, 11),  # sixth kernel 13 unused
        **_GRAY_ENHANCE,
    },
    "organamnist": _ORGAN,
    "organcmnist": _ORGAN,
    "organsmnist": _ORGAN,
}
for _flag, _table in _MEDMNIST_C.items():
    for _name, _params in _table.items():
        if _name not in _REGISTRY or len(_params) != len(SEVERITIES):
            raise AssertionError(f"MedMNIST-C's {_flag} {_name} needs a known name and one parameter per severity")
del _flag, _table, _name, _params


def list_corruptions() -> list[str]:
    """Names of every corruption, sorted.

    Returns
    -------
    list[str]
        E.g. ``["bubble", "black_corner", ...]``; each is accepted by :func:`corrupt`.
    """
    return sorted(_REGISTRY)


def default_corruptions(dataset: str, *, channels: int | None = None) -> list[str]:
    """The corruptions MedMNIST-C applies to ``dataset`` (its per-modality choice).

    Parameters
    ----------
    dataset : str
        A MedMNIST flag, e.g. ``"pneumoniamnist"``. An unknown flag gets the gray
        radiology list, plus the microscopy one when ``channels == 3``.
    channels : int, optional
        Image channels; RGB-only corruptions are left out for 1 channel.
    """
    names = list(_DEFAULTS.get(dataset, _GRAY_RADIOLOGY if channels != 3 else _GRAY_RADIOLOGY + _MICROSCOPY))
    names = list(dict.fromkeys(names))
    if channels == 1:
        names = [name for name in names if not _REGISTRY[name].rgb_only]
    return names


def check_corruption(name: object, severity: object) -> tuple[str, int]:
    """Validate a corruption name and severity; return them normalised.

    Raises
    ------
    CorruptionError
        For an unknown name or a severity outside 1..5.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CorruptionError(
            f"Unknown corruption {name!r}{hint}; known: {', '.join(list_corruptions())}."
        )
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise CorruptionError(
            f"The 'severity' of corruption {name!r} must be an int in 1..5. Got {severity!r} instead."
        )
    return name, int(severity)


def parameter_source(name: str, dataset: str | None) -> str:
    """Whose severity values :func:`corrupt` uses for ``name`` on ``dataset``: ``"medmnist-c"``
    (its per-dataset registry) or ``"medfed"`` (this module's single table)."""
    return "medmnist-c" if dataset is not None and name in _MEDMNIST_C.get(dataset, {}) else "medfed"


def corrupt(images: np.ndarray, name: str, severity: int, seed: int, *, dataset: str | None = None) -> np.ndarray:
    """Apply one corruption at one severity to a batch of images.

    Parameters
    ----------
    images : np.ndarray
        ``uint8`` ``[N, H, W]`` (gray), ``[N, H, W, 1]`` or ``[N, H, W, 3]`` (RGB), any
        side (MedMNIST's 28..224 px).
    name : str
        One of :func:`list_corruptions`.
    severity : int
        1 (mild) .. 5 (strong).
    seed : int
        Seed of the corruption's random draws (noise, directions, positions).
    dataset : str, optional
        A MedMNIST flag, e.g. ``"pneumoniamnist"``: where MedMNIST-C's registry gives
        this corruption's parameters for that dataset, they are used (converted where
        its parameter means something else, see the module docstring). ``None`` (the
        site simulator), another flag or a corruption MedMNIST-C does not give for the
        dataset: the single table of this module.

    Returns
    -------
    np.ndarray
        New ``uint8`` array of the same shape, values in [0, 255]; ``images`` is not
        modified. The same arguments give the same output. The images are corrupted in
        chunks of about 1 MB of float64 each, so memory beyond the output stays a few MB
        (under 20 MB for ``saturate``) whatever the batch size.

    Raises
    ------
    CorruptionError
        For an unknown name, a severity outside 1..5, a ``dataset`` that is not a str
        or None, images that are not uint8
        ``[N, H, W(, C)]`` with C in (1, 3), or an RGB-only corruption on gray images.
    """
    name, severity = check_corruption(name, severity)
    if dataset is not None and not isinstance(dataset, str):
        raise CorruptionError(f"corrupt({name!r}) needs 'dataset' as a MedMNIST flag or None. Got {dataset!r} instead.")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise CorruptionError(
            f"corrupt({name!r}) needs uint8 images [N, H, W], [N, H, W, 1] or [N, H, W, 3]. "
            f"Got {images.dtype} {tuple(images.shape)} instead."
        )
    spec = _REGISTRY[name]
    source = images[..., None] if images.ndim == 3 else images
    if spec.rgb_only and source.shape[-1] != 3:
        raise CorruptionError(f"Corruption {name!r} changes colour saturation and needs RGB images [N, H, W, 3].")
    if images.shape[0] == 0:
        return images.copy()
    params = _MEDMNIST_C.get(dataset, {}).get(name, spec.params) if dataset is not None else spec.params
    param = params[severity - 1]
    rng = np.random.default_rng(seed)
    draws = spec.draw(rng, source.shape, param) if spec.draw is not None else ()
    scale = _spatial_scale(min(source.shape[1:3]))
    # Chunks of whole images, so that the float64 copies are of one chunk (~1 MB each),
    # not of the batch (8 bytes per value, several copies: ~32x the uint8 input). Every
    # corruption works image by image and gets its batch's draws, so the output does not
    # depend on the chunking.
    out = np.empty(source.shape, dtype=np.uint8)
    step = max(1, _CHUNK_VALUES // source[0].size)
    for start in range(0, len(source), step):
        stop = min(start + step, len(source))
        x = source[start:stop].astype(np.float64)
        x /= 255.0
        chunk_draws = tuple(d[start:stop] if isinstance(d, np.ndarray) else d for d in draws)
        result = np.asarray(spec.apply(x, param, chunk_draws, scale)) * 255.0
        del x
        np.rint(result, out=result)
        np.clip(result, 0, 255, out=result)
        out[start:stop] = result
        del result
    return out.reshape(images.shape)
