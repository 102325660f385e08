"""Training data: splits, the tile table, normalisation, datasets, loaders, fingerprints (augmentation:
tests/test_augment_gpu.py)."""

from __future__ import annotations

import logging
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from pipeline.augment import build_transform
from pipeline.data import (
    TileDataset,
    balanced_sampler,
    build_tile_table,
    channel_normalisation,
    data_fingerprint,
    make_loader,
)
from pipeline.demo import DemoSettings, generate
from pipeline.errors import GaplessError
from pipeline.samples import Sample, load_sample_sheet
from pipeline.splits import split_samples
from pipeline.tiling import TileSettings, tile_source

pytest.importorskip("openslide")

CLASSES = ["negative", "positive"]
DEMO = DemoSettings(slides=4, images=4, slide_width=1024, slide_height=768, image_size=256, witness_fraction=0.2, seed=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Samples and stores of a tiny demo: slides at 1 µm/px, images at 0.5 µm/px, 32-px tiles.

    ``slide-01-plain`` is slide-01 tiled without annotations; ``blank`` is an empty (no tissue) store.
    """
    root = tmp_path_factory.mktemp("data")
    samples = load_sample_sheet(generate(root / "demo", DEMO, progress=False), CLASSES)
    stores = {}
    for s in samples:
        slide = s.kind == "slide"
        settings = TileSettings(mpp=1.0 if slide else 0.5, tile_size=32, min_tissue=0.25 if slide else 0.1,
                                annotations=str(s.annotations))
        stores[s.sample_id] = tile_source(s.path, root / "tiles" / f"{s.sample_id}.zarr", settings, progress=False).out
    plain = next(s for s in samples if s.sample_id == "slide-01")
    stores["slide-01-plain"] = tile_source(plain.path, root / "tiles" / "plain.zarr",
                                           TileSettings(mpp=1.0, tile_size=32), progress=False).out
    blank_tif = root / "blank.tif"
    tifffile.imwrite(blank_tif, np.full((256, 256, 3), 245, np.uint8), photometric="rgb")
    stores["blank"] = tile_source(blank_tif, root / "tiles" / "blank.zarr",
                                  TileSettings(mpp=1.0, tile_size=32, slide_mpp=1.0, on_empty="flag"), progress=False).out
    return {"root": root, "samples": samples, "stores": stores}


def by_kind(demo, kind):
    return [s for s in demo["samples"] if s.kind == kind]


@pytest.fixture(scope="module")
def slide_table(demo):
    return build_tile_table(by_kind(demo, "slide"), demo["stores"], CLASSES)


@pytest.fixture(scope="module")
def image_table(demo):
    return build_tile_table(by_kind(demo, "image"), demo["stores"], CLASSES)


# ---------------------------------------------------------------------------------------------
# splits


def cohort(n_groups=12, per_group=(1, 2, 3)):
    """Samples in groups of varying size; a group's samples share its label (alternating)."""
    samples = []
    for g in range(n_groups):
        for k in range(per_group[g % len(per_group)]):
            samples.append(Sample(f"s{g}-{k}", Path(f"/x/s{g}-{k}.tif"), CLASSES[g % 2], group=f"patient{g}"))
    return samples


def test_split_keeps_groups_together_and_is_stratified():
    samples = cohort()
    for seed in range(10):
        split = split_samples(samples, seed)
        assert list(split) == [s.sample_id for s in samples]
        sides = {}
        for s in samples:
            sides.setdefault(s.group, set()).add(split[s.sample_id])
        assert all(len(v) == 1 for v in sides.values()), "a group on two sides"
        by_split = {k: Counter(s.label for s in samples if split[s.sample_id] == k) for k in ("train", "val", "test")}
        for k, counts in by_split.items():
            assert counts["positive"] > 0 and counts["negative"] > 0, (seed, k, counts)
        n_train = sum(by_split["train"].values())
        assert 0.45 * len(samples) <= n_train <= 0.75 * len(samples)


def test_split_is_deterministic_for_a_seed_and_varies_with_it():
    samples = cohort()
    assert split_samples(samples, 1) == split_samples(samples, 1)
    assert len({tuple(split_samples(samples, seed).values()) for seed in range(6)}) > 1


def test_split_gives_every_split_both_classes_when_the_counts_just_allow():
    # 3 positive and 3 negative single-sample groups: one of each per split, whatever the seed
    samples = [Sample(f"s{i}", Path(f"/x/{i}"), CLASSES[i % 2]) for i in range(6)]
    for seed in range(5):
        split = split_samples(samples, seed)
        for k in ("train", "val", "test"):
            assert {s.label for s in samples if split[s.sample_id] == k} == set(CLASSES)


def test_split_respects_fixed_splits_and_their_groups():
    samples = cohort()
    fixed = {"s0-0": "test", "s5-0": "val", "s3-0": "train"}
    samples = [Sample(s.sample_id, s.path, s.label, s.group, split=fixed.get(s.sample_id)) for s in samples]
    for seed in range(5):
        split = split_samples(samples, seed)
        assert split["s0-0"] == "test" and split["s5-0"] == "val" and split["s3-0"] == "train"
        assert split["s5-1"] == split["s5-2"] == "val"  # group-mates follow the fixed sample


def test_split_errors_when_impossible():
    two = [Sample(f"s{i}", Path(f"/x/{i}"), CLASSES[i % 2], group=f"g{i}") for i in range(2)]
    with pytest.raises(GaplessError, match="cannot fill 3 splits"):
        split_samples(two, 0)
    assert set(split_samples(two, 0, fractions=(0.5, 0.5, 0.0)).values()) == {"train", "val"}
    same_group = [Sample(f"s{i}", Path(f"/x/{i}"), "positive", group="one") for i in range(5)]
    with pytest.raises(GaplessError, match="cannot fill"):
        split_samples(same_group, 0)
    conflicting = [Sample("a", Path("/x/a"), "positive", "g", split="train"),
                   Sample("b", Path("/x/b"), "negative", "g", split="test"), *cohort(4)]
    with pytest.raises(GaplessError, match="more than one split"):
        split_samples(conflicting, 0)
    all_fixed = [Sample(f"s{i}", Path(f"/x/{i}"), CLASSES[i % 2], split="train") for i in range(6)]
    with pytest.raises(GaplessError, match="val, test would be empty"):
        split_samples(all_fixed, 0)
    with pytest.raises(GaplessError, match="fractions"):
        split_samples(cohort(), 0, fractions=(1.0, -0.5, 0.5))


# ---------------------------------------------------------------------------------------------
# tile table


def test_tile_labels_come_from_annotations_else_from_the_sample(demo, slide_table):
    t = slide_table
    assert t.sample_ids == [s.sample_id for s in by_kind(demo, "slide")]
    assert t.channels == 3 and t.tile_size == 32 and t.dtype == np.uint8 and t.modality == "brightfield"
    assert t.mpp == pytest.approx(1.0)
    for k, sid in enumerate(t.sample_ids):
        rows = t.store_index == k
        stored = zarr.open_group(t.stores[k], mode="r")["labels"][:]
        assert (stored >= 0).all()  # every demo sample has an annotation file (negatives: an empty one)
        np.testing.assert_array_equal(t.tile_label[rows], stored)
        np.testing.assert_array_equal(t.tile_index[rows], np.arange(rows.sum()))
        np.testing.assert_array_equal(t.coords[rows], zarr.open_group(t.stores[k], mode="r")["coords"][:])
    positive = t.store_index == t.sample_ids.index("slide-00")
    assert (t.sample_label[positive] == 1).all()
    # a positive slide: the tiles touching a witness are positive, the others negative
    assert 0 < t.tile_label[positive].sum() < positive.sum()

    plain = next(s for s in demo["samples"] if s.sample_id == "slide-01")
    positive_plain = Sample("slide-01-plain", plain.path, "positive", kind="slide")  # no annotations: label of the sample
    t2 = build_tile_table([positive_plain], demo["stores"], CLASSES)
    assert len(t2) > 0 and (t2.tile_label == 1).all() and t2.tile_label.dtype == np.int64


def test_mixing_slides_and_images_is_refused(demo):
    samples = by_kind(demo, "slide")[:2] + by_kind(demo, "image")[:1]
    with pytest.raises(GaplessError, match="separate cohorts") as info:
        build_tile_table(samples, lambda sid: demo["stores"][sid], CLASSES)
    assert "field-00" in str(info.value) and "uint16" in str(info.value)


def test_empty_stores_are_skipped_with_a_warning(demo, caplog):
    blank = Sample("blank", demo["root"] / "blank.tif", "negative")
    with caplog.at_level(logging.WARNING, logger="gapless.data"):
        t = build_tile_table([blank, *by_kind(demo, "slide")[:1]], demo["stores"], CLASSES)
    assert t.sample_ids == ["slide-00"] and "no tiles" in caplog.text
    with pytest.raises(GaplessError, match="label 'maybe'"):
        build_tile_table([Sample("slide-00", blank.path, "maybe")], demo["stores"], CLASSES)


def test_subset_keeps_store_indices(slide_table):
    sub = slide_table.subset(slide_table.store_index == 2)
    assert len(sub) == (slide_table.store_index == 2).sum() and set(sub.store_index) == {2}
    assert sub.stores == slide_table.stores
    assert len(slide_table.for_samples(["slide-01", "slide-03"])) == np.isin(slide_table.store_index, [1, 3]).sum()


@pytest.mark.parametrize("table_name", ["slide_table", "image_table"])
def test_normalisation_equals_the_pixel_statistics(request, table_name):
    table = request.getfixturevalue(table_name)
    mean, std = channel_normalisation(table)
    pixels = np.concatenate([
        zarr.open_group(s, mode="r")["tiles"][:, ::8, ::8].reshape(-1, table.channels) for s in table.stores
    ]).astype(np.float64)  # the stores' statistics come from every 8th pixel
    if all(a.tile_codec["lossless"] for a in table.store_attrs):
        np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-4)
        np.testing.assert_allclose(std, pixels.std(0), rtol=1e-3)
    else:  # JPEG slides: the statistics are of the pixels before compression, which JPEG keeps within a tenth
        assert table_name == "slide_table"  # of a grey level on average, and smooths a little (4:2:0 chroma)
        np.testing.assert_allclose(mean, pixels.mean(0), atol=0.1)
        np.testing.assert_allclose(std, pixels.std(0), rtol=0.02)


# ---------------------------------------------------------------------------------------------
# dataset, loaders, sampler


def test_dataset_items(image_table):
    mean, std = channel_normalisation(image_table)
    raw_ds = TileDataset(image_table)
    ds = TileDataset(image_table, build_transform("fluorescence", False, mean, std))
    assert len(ds) == len(raw_ds) == len(image_table)
    for i in (0, len(ds) // 2, len(ds) - 1):
        x, label, sample = ds[i]
        assert x.shape == (2, 32, 32) and x.dtype == torch.float32
        assert label.dtype == torch.int64 and int(label) == image_table.tile_label[i]
        assert sample.dtype == torch.int64 and int(sample) == image_table.store_index[i]
        raw = zarr.open_group(image_table.stores[int(sample)], mode="r")["tiles"][image_table.tile_index[i]]
        np.testing.assert_array_equal(raw_ds[i][0].numpy(), raw)  # the loader's item: the raw tile
        np.testing.assert_allclose(x.numpy().transpose(1, 2, 0) * std + mean, raw, rtol=1e-4, atol=1e-2)
    restored = pickle.loads(pickle.dumps(ds))  # handles opened above are not pickled
    assert restored._readers == {} and torch.equal(restored[0][0], ds[0][0])


def first_batch(table, seed, workers):
    mean, std = channel_normalisation(table)
    loader = make_loader(TileDataset(table), batch_size=16, workers=workers, sampler=balanced_sampler(table, seed), seed=seed)
    x, labels, samples = next(iter(loader))
    return build_transform(table.modality, True, mean, std, seed=seed)(x), labels, samples


def test_loader_with_workers_is_deterministic_for_a_seed(slide_table):
    x, labels, samples = first_batch(slide_table, 7, workers=2)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert labels.shape == (16,) and samples.shape == (16,)
    x2, labels2, samples2 = first_batch(slide_table, 7, workers=2)
    assert torch.equal(x, x2) and torch.equal(labels, labels2) and torch.equal(samples, samples2)
    x3, *_ = first_batch(slide_table, 8, workers=2)
    assert not torch.equal(x, x3)
    x0, *_ = first_batch(slide_table, 7, workers=0)
    assert torch.equal(x0, x)  # the workers only read: the augmentation does not depend on how many there are


def test_balanced_sampler_draws_classes_evenly(slide_table):
    counts = slide_table.class_counts()
    assert counts[1] * 4 < counts[0]  # witnesses are rare: an imbalanced table
    draws = list(balanced_sampler(slide_table, seed=0, num_samples=4000))
    share = (slide_table.tile_label[draws] == 1).mean()
    assert 0.45 < share < 0.55
    assert draws == list(balanced_sampler(slide_table, seed=0, num_samples=4000))


# ---------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_changes_when_a_store_changes(demo, tmp_path):
    stores = [tmp_path / f"{sid}.zarr" for sid in ("slide-00", "slide-01")]
    for sid, dst in zip(("slide-00", "slide-01"), stores):
        shutil.copytree(demo["stores"][sid], dst)
    sheet = demo["root"] / "demo" / "samples.csv"
    first = data_fingerprint(sheet, stores)
    assert len(first) == 16 and first == data_fingerprint(sheet, list(reversed(stores)))
    assert data_fingerprint(None, stores) != first
    group = zarr.open_group(stores[0], mode="r+")
    labels = group["labels"][:]
    labels[0] = 1 - labels[0]
    group["labels"][:] = labels
    relabelled = data_fingerprint(sheet, stores)
    assert relabelled != first
    group.attrs["seconds"] = 123.0  # a timing is not data
    assert data_fingerprint(sheet, stores) == relabelled
    group.attrs["mpp"] = 2.0
    assert data_fingerprint(sheet, stores) != relabelled
