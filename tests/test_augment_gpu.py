"""The device-side tile transform (``pipeline.augment``) against the albumentations pipeline it replaced, and
the loader that feeds it (raw tiles from ``TileReader``, ``DeviceBatches``).

``Reference`` below is that albumentations pipeline as it was (albumentations 2.0.8: D4, the HED jitter and
``RandomBrightnessContrast`` for brightfield RGB or the per-channel intensity jitter otherwise, ``Normalize``,
``Resize``), kept here only to compare with. Evaluation must match it value for value; training in
distribution, over many draws on the same tiles (see ``draw_statistics``).
"""

from __future__ import annotations

import math
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from pipeline import data
from pipeline.augment import STAINS, build_transform
from pipeline.errors import GaplessError
from pipeline.samples import Sample
from pipeline.tile_reader import TileReader
from pipeline.tiling import TileSettings, tile_source

DATA = Path(__file__).parent / "data"
CLASSES = ["negative", "positive"]
N_DRAWS = 1200  # draws per path in the distribution tests


# ---------------------------------------------------------------------------------------------
# The albumentations pipeline this replaced (pipeline/augment.py before the device transform)


class HEDJitter(A.ImageOnlyTransform):
    def __init__(self, alpha=0.15, beta=0.05, p=0.8):
        super().__init__(p=p)
        self.alpha, self.beta = alpha, beta
        self._unmix = np.linalg.inv(STAINS)

    def get_params(self):
        scale, shift = np.ones(3), np.zeros(3)
        scale[:2] = self.random_generator.uniform(1 - self.alpha, 1 + self.alpha, 2)
        shift[:2] = self.random_generator.uniform(-self.beta, self.beta, 2)
        return {"scale": scale, "shift": shift}

    def apply(self, img, scale, shift, **params):
        white = float(np.iinfo(img.dtype).max)
        od = -np.log(np.maximum(img.astype(np.float32), 1.0) / white)
        mix = (self._unmix * scale[None, :]) @ STAINS
        od = od @ mix.astype(np.float32) + (shift @ STAINS).astype(np.float32)
        return np.rint(white * np.exp(-np.maximum(od, 0.0))).astype(img.dtype)


class ChannelIntensityJitter(A.ImageOnlyTransform):
    def __init__(self, mean, std, p=0.8):
        super().__init__(p=p)
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def get_params(self):
        rng, n = self.random_generator, len(self.mean)
        return {"gamma": np.exp(rng.uniform(math.log(0.8), math.log(1.25), n)).astype(np.float32),
                "contrast": rng.uniform(0.8, 1.2, n).astype(np.float32),
                "brightness": rng.uniform(-0.2, 0.2, n).astype(np.float32)}

    def apply(self, img, gamma, contrast, brightness, **params):
        x = img.astype(np.float32)
        ref = np.maximum(self.mean + 2 * self.std, 1e-6)
        x = ref * np.power(np.maximum(x, 0.0) / ref, gamma)
        return np.maximum(self.mean + contrast * (x - self.mean) + brightness * self.std, 0.0)


def reference(modality, train, mean, std, image_size=None, tile_size=None, seed=0):
    """The old ``build_transforms`` (H×W×C → H'×W'×C float32), seeded as the old ``seed_transform`` did."""
    steps = []
    if train:
        steps.append(A.D4(p=1.0))
        if modality == "brightfield" and len(mean) == 3:
            steps += [HEDJitter(p=0.8), A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5)]
        else:
            steps.append(ChannelIntensityJitter(mean, std, p=0.8))
    steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=1.0))
    if image_size is not None and image_size != tile_size:
        shrink = tile_size is not None and image_size < tile_size
        steps.append(A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))
    transform = A.Compose(steps)
    transform.set_random_seed(seed)
    for child, child_seed in zip(steps, np.random.SeedSequence(seed).generate_state(len(steps))):
        child.set_random_seed(int(child_seed))
    return transform


def old_batch(transform, tiles: np.ndarray) -> np.ndarray:
    """B×C×S×S float32 of the reference pipeline, tile by tile."""
    return np.stack([transform(image=t)["image"] for t in tiles]).transpose(0, 3, 1, 2)


def new_batch(transform, tiles: np.ndarray) -> np.ndarray:
    return transform(torch.from_numpy(tiles)).numpy()


# ---------------------------------------------------------------------------------------------
# Tiles


def he_tiles(size=64, n=8) -> np.ndarray:
    """n crops (uint8 RGB) of the H&E field ``he-target.png``."""
    field = np.asarray(Image.open(DATA / "he-target.png").convert("RGB"))
    step = (field.shape[0] - size) // n
    return np.stack([field[k * step : k * step + size, (n - k) * step : (n - k) * step + size] for k in range(n)])


def nuclei_tiles(size=64, n=8) -> np.ndarray:
    """n two-channel uint16 tiles from ``dsb2018-nuclei.tif``: the image, and a dimmer turned copy (another exposure)."""
    image = tifffile.imread(DATA / "dsb2018-nuclei.tif").astype(np.float64)
    second = np.rot90(image) * 0.6 + 40
    both = np.stack([image, second], -1).round().astype(np.uint16)
    step = (image.shape[0] - size) // n
    return np.ascontiguousarray(np.stack([both[k * step : k * step + size, k * step : k * step + size] for k in range(n)]))


def stats_of(tiles):
    pixels = tiles.reshape(-1, tiles.shape[-1]).astype(np.float64)
    return list(pixels.mean(0)), list(np.maximum(pixels.std(0), 1.0))


# ---------------------------------------------------------------------------------------------
# Evaluation: the same values as before


@pytest.mark.parametrize("kind", ["he", "nuclei"])
@pytest.mark.parametrize("image_size", [None, 48, 37, 96, 150])
def test_evaluation_output_equals_the_old_normalisation(kind, image_size):
    tiles = he_tiles() if kind == "he" else nuclei_tiles()
    modality = "brightfield" if kind == "he" else "fluorescence"
    mean, std = stats_of(tiles)
    old = old_batch(reference(modality, False, mean, std, image_size, tiles.shape[1]), tiles)
    transform = build_transform(modality, False, mean, std, image_size=image_size)
    new = new_batch(transform, tiles)
    assert new.dtype == np.float32 and new.shape == old.shape
    np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-4)  # normalised units
    np.testing.assert_array_equal(new, new_batch(transform, tiles))  # deterministic


# ---------------------------------------------------------------------------------------------
# Training: the same distribution as before


def orientations(out: np.ndarray, tiles: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(N,) which of the 8 D4 images of its input tile each output is (highest correlation of the channel means)."""
    def z(a):
        a = a.reshape(len(a), -1)
        a = a - a.mean(1, keepdims=True)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    grey = tiles.astype(np.float64).mean(-1)
    candidates = np.stack([z(np.stack([np.flip(np.rot90(g, e % 4), 1) if e >= 4 else np.rot90(g, e % 4) for e in range(8)]))
                           for g in grey])  # tiles × 8 × pixels
    outputs = z(out.mean(1))
    return np.einsum("np,nep->ne", outputs, candidates[index]).argmax(1)


def hed_shift(out: np.ndarray, tiles: np.ndarray, index: np.ndarray, mean, std) -> np.ndarray:
    """(N, 2) change of the mean H and E concentration (OD units) from each input tile to its output."""
    def concentration(rgb):  # (..., 3) raw levels → mean (H, E) per image
        od = -np.log(np.maximum(rgb, 1.0) / 255.0)
        return (od @ np.linalg.inv(STAINS))[..., :2].reshape(len(rgb), -1, 2).mean(1)

    raw = out.transpose(0, 2, 3, 1) * np.asarray(std) + np.asarray(mean)
    return concentration(raw) - concentration(tiles.astype(np.float64))[index]


def draw_statistics(out: np.ndarray, tiles: np.ndarray, index: np.ndarray, mean, std, brightfield: bool) -> dict:
    """Per-draw scalars, each against the draw's own input tile so that what differs between tiles drops out:
    per channel the change of the mean (normalised units) and the ratio of the stds, the D4 orientation,
    and for brightfield the change of the mean H and E concentrations."""
    plain = new_batch(build_transform("brightfield" if brightfield else "fluorescence", False, mean, std), tiles)[index]
    stats = {}
    for c in range(out.shape[1]):
        stats[f"mean change {c}"] = out[:, c].mean((1, 2)) - plain[:, c].mean((1, 2))
        stats[f"std ratio {c}"] = out[:, c].std((1, 2)) / plain[:, c].std((1, 2))
    stats["orientation"] = orientations(out, tiles, index)
    if brightfield:
        shift = hed_shift(out, tiles, index, mean, std)
        stats["H shift"], stats["E shift"] = shift[:, 0], shift[:, 1]
    return stats


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                        - np.searchsorted(np.sort(b), grid, "right") / len(b)).max())


def assert_same_distribution(old: dict, new: dict, n: int) -> None:
    """Old and new per-draw statistics drawn from one distribution, within what N draws can tell apart.

    Each scalar: the means differ by under 4 standard errors of the difference, the spreads (std over
    draws) by under 15 % (about 5 standard errors at N = 1200), and the two-sample Kolmogorov–Smirnov
    statistic is under its α = 0.001 critical value, 1.95·sqrt(2/N). The D4 orientations: each of the 8
    in 1/8 ± 0.045 of the draws (about 4.7 binomial standard errors) in both.
    """
    for name, a in old.items():
        b = new[name]
        if name == "orientation":
            for got in (a, b):
                share = np.bincount(got, minlength=8) / n
                assert np.all(np.abs(share - 1 / 8) < 0.045), (name, share)
            continue
        se = math.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 4 * se + 1e-6, (name, a.mean(), b.mean(), se)
        assert 0.85 < b.std() / a.std() < 1.15, (name, a.std(), b.std())
        assert ks_statistic(a, b) < 1.95 * math.sqrt(2 / n), (name, ks_statistic(a, b))


@pytest.mark.parametrize("kind", ["he", "nuclei"])
def test_training_augmentation_has_the_old_distribution(kind):
    tiles = he_tiles() if kind == "he" else nuclei_tiles()
    brightfield = kind == "he"
    modality = "brightfield" if brightfield else "fluorescence"
    mean, std = stats_of(tiles)
    index = np.arange(N_DRAWS) % len(tiles)
    batch = tiles[index]
    old = old_batch(reference(modality, True, mean, std, seed=11), batch)
    new = new_batch(build_transform(modality, True, mean, std, seed=11), batch)
    assert old.shape == new.shape and new.dtype == np.float32
    assert_same_distribution(draw_statistics(old, tiles, index, mean, std, brightfield),
                             draw_statistics(new, tiles, index, mean, std, brightfield), N_DRAWS)
    # the share of tiles left as they were (only turned): 0.2 × 0.5 brightfield, 0.2 otherwise
    evaluated = new_batch(build_transform(modality, False, mean, std), tiles)
    kept = {}
    for name, out in (("old", old), ("new", new)):
        turned = [np.flip(np.rot90(evaluated, e % 4, (2, 3)), 3) if e >= 4 else np.rot90(evaluated, e % 4, (2, 3))
                  for e in range(8)]
        same = np.zeros(N_DRAWS, bool)
        for image in turned:
            same |= np.abs(out - image[index]).reshape(N_DRAWS, -1).max(1) < 1e-4
        kept[name] = same.mean()
    expected = 0.1 if brightfield else 0.2
    assert abs(kept["old"] - expected) < 0.04 and abs(kept["new"] - expected) < 0.04, kept


def test_channels_are_jittered_independently():
    tiles = nuclei_tiles()
    mean, std = stats_of(tiles)
    same = np.repeat(tiles[:, :, :, :1], 2, axis=3)  # two identical channels
    out = new_batch(build_transform("fluorescence", True, mean[:1] * 2, std[:1] * 2, seed=3), same[np.arange(400) % 8])
    shifts = out.mean((2, 3))
    assert abs(np.corrcoef(shifts[:, 0], shifts[:, 1])[0, 1]) < 0.98  # not one factor for both
    assert not np.allclose(out[:, 0], out[:, 1])


def test_training_keeps_16_bit_range_and_repeats_for_a_seed():
    tiles = nuclei_tiles()
    tiles = (tiles.astype(np.float64) * 4000 / tiles.max()).astype(np.uint16)
    mean, std = stats_of(tiles)
    a = build_transform("fluorescence", True, mean, std, seed=1)(torch.from_numpy(tiles))
    raw = a.numpy().transpose(0, 2, 3, 1) * np.asarray(std) + np.asarray(mean)
    assert raw.max() > 2500  # jittered, never clipped to 8 bit
    b = build_transform("fluorescence", True, mean, std, seed=1)(torch.from_numpy(tiles))
    c = build_transform("fluorescence", True, mean, std, seed=2)(torch.from_numpy(tiles))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hed_jitter_is_the_identity_at_zero_jitter():
    from pipeline.augment import hed_jitter

    tiles = torch.from_numpy(he_tiles(32, 4)).float()
    ones, zeros = torch.ones(4, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
    on = torch.ones(4, dtype=torch.bool)
    assert torch.equal(hed_jitter(tiles.clone(), 255.0, True, on, ones, zeros), tiles)
    assert not torch.equal(hed_jitter(tiles.clone(), 255.0, True, on, ones * 1.1, zeros), tiles)


# ---------------------------------------------------------------------------------------------
# Reading: raw tiles, as zarr reads them


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A JPEG store (CMU slide), a lossless 8-bit one (the H&E field) and a 16-bit one (the nuclei image)."""
    root = tmp_path_factory.mktemp("stores")
    settings = {
        "cmu": (DATA / "CMU-1-Small-Region.svs", TileSettings(mpp=4.0, tile_size=32)),
        "he": (DATA / "he-target.png", TileSettings(mpp=1.0, tile_size=32, slide_mpp=0.5, codec="lossless")),
        "dsb": (DATA / "dsb2018-nuclei.tif", TileSettings(mpp=0.5, tile_size=32, slide_mpp=0.5, min_tissue=0.1)),
    }
    return {name: tile_source(src, root / f"{name}.zarr", s, progress=False).out for name, (src, s) in settings.items()}


@pytest.mark.parametrize("name, codec", [("cmu", "gapless.jpeg"), ("he", "blosc"), ("dsb", "blosc")])
def test_tile_reader_reads_what_zarr_reads(stores, name, codec):
    tiles = zarr.open_array(Path(stores[name]) / "tiles", mode="r")
    assert codec in (Path(stores[name]) / "tiles" / "zarr.json").read_text()
    reader = TileReader(stores[name])
    for i in range(tiles.shape[0]):
        tile = reader.read(i)
        assert tile.dtype == tiles.dtype and tile.flags.writeable
        np.testing.assert_array_equal(tile, tiles[i])
    assert reader._layout is not None  # the fast path was taken


def test_a_damaged_shard_index_is_the_one_line_error(stores, tmp_path):
    import shutil

    store = tmp_path / "cmu.zarr"
    shutil.copytree(stores["cmu"], store)
    shard = store / "tiles" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # inside the index at the end of the shard
    shard.write_bytes(bytes(raw))
    reader = TileReader(store)
    np.testing.assert_array_equal(reader.read(0), zarr.open_array(store / "tiles", mode="r")[0])  # other shards read
    with pytest.raises(GaplessError) as err:
        reader.read(16)
    assert err.value.path == str(store) and "tile 16 (tiles/c/1/0/0/0) cannot be read" in err.value.cause


def table_of(store) -> data.TileTable:
    return data.build_tile_table([Sample("s", Path(store), CLASSES[0])], {"s": store}, CLASSES)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_gives_raw_tiles_and_device_batches_the_model_input(stores, workers):
    table = table_of(stores["dsb"])
    mean, std = data.channel_normalisation(table)
    dataset = data.TileDataset(table)
    tile = dataset[3][0]
    assert tile.dtype == torch.uint16 and tuple(tile.shape) == (32, 32, 1)
    loader = data.make_loader(dataset, batch_size=8, workers=workers)
    raw = torch.cat([x for x, _, _ in loader])
    np.testing.assert_array_equal(raw.numpy(), zarr.open_array(Path(stores["dsb"]) / "tiles", mode="r")[:])
    evaluate = build_transform(table.modality, False, mean, std, image_size=48)
    batches = data.DeviceBatches(loader, evaluate, "cpu")
    assert len(batches) == len(loader)
    x = torch.cat([x for x, _, _ in batches])
    assert x.dtype == torch.float32 and tuple(x.shape) == (len(table), 1, 48, 48)
    np.testing.assert_allclose(x.numpy(), old_batch(reference(table.modality, False, mean, std, 48, 32), raw.numpy()),
                               rtol=1e-5, atol=1e-4)
    one = data.TileDataset(table, evaluate)[3][0]  # a tile alone through the transform (the map grid's way)
    torch.testing.assert_close(one, x[3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_batches_are_the_cpu_transform(stores):
    table = table_of(stores["cmu"])
    mean, std = data.channel_normalisation(table)
    loader = data.make_loader(data.TileDataset(table), batch_size=16, workers=1, pin_memory=True)
    cpu = torch.cat([x for x, _, _ in data.DeviceBatches(loader, build_transform("brightfield", False, mean, std, 48), "cpu")])
    cuda = [x for x, _, _ in data.DeviceBatches(loader, build_transform("brightfield", False, mean, std, 48), "cuda")]
    assert all(x.is_cuda and x.is_contiguous(memory_format=torch.channels_last) for x in cuda)
    torch.testing.assert_close(torch.cat(cuda).cpu(), cpu, rtol=1e-5, atol=1e-4)
    tiles = torch.from_numpy(he_tiles(64, 8)).repeat(8, 1, 1, 1)
    m, s = stats_of(tiles.numpy())
    on_cpu = build_transform("brightfield", True, m, s, seed=5)(tiles)
    on_gpu = build_transform("brightfield", True, m, s, seed=5)(tiles.cuda()).cpu()
    # the same draws; float rounding may move a pixel across a level's rounding edge (one level)
    assert (on_cpu - on_gpu).abs().max() <= 1.01 / min(s) and (on_cpu - on_gpu).abs().mean() < 1e-3
