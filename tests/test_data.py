"""Generated tasks (determinism, label semantics) and ImageFolder loading."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from timm_peft.data import (TASKS, DataError, SyntheticTask, build_splits, holdout_split,
                            list_tasks, load_image_folder)


def _mask(img, thresh=100):
    """Object pixels of a structured task: much brighter than its dark background."""
    return np.asarray(img, dtype=np.float32).max(-1) > thresh


def _components(mask):
    """Number of 4-connected components (an independent flood fill)."""
    seen = np.zeros_like(mask, dtype=bool)
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        n += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] \
                        and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return n


@pytest.mark.parametrize("name", list_tasks())
def test_task_is_deterministic_balanced_and_pil(name):
    ds = SyntheticTask(name, "train", num_samples=2 * len(TASKS[name].classes), image_size=32, seed=3)
    img, label = ds[5]
    assert isinstance(img, Image.Image) and img.size == (32, 32) and img.mode == "RGB"
    assert label == ds.targets[5]
    assert np.bincount(ds.targets).tolist() == [2] * len(ds.classes)
    again = SyntheticTask(name, "train", num_samples=len(ds), image_size=32, seed=3, cache=False)
    assert np.array_equal(np.asarray(again[5][0]), np.asarray(img))
    other_seed = SyntheticTask(name, "train", num_samples=len(ds), image_size=32, seed=4)
    other_split = SyntheticTask(name, "test", num_samples=len(ds), image_size=32, seed=3)
    assert not np.array_equal(np.asarray(other_seed[5][0]), np.asarray(img))
    assert not np.array_equal(np.asarray(other_split[5][0]), np.asarray(img))


def test_position_label_is_the_grid_cell_of_the_object():
    ds = SyntheticTask("position", num_samples=45, image_size=48)
    for i in range(len(ds)):
        img, label = ds[i]
        ys, xs = np.nonzero(_mask(img))
        cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
        row, col = divmod(label, 3)
        # the centroid of a symmetric shape is its centre, up to anti-aliasing
        assert row * 16 - 1.5 <= cy <= (row + 1) * 16 + 1.5, (i, label, cy)
        assert col * 16 - 1.5 <= cx <= (col + 1) * 16 + 1.5, (i, label, cx)


def test_count_label_is_the_number_of_objects():
    ds = SyntheticTask("count", num_samples=36, image_size=64)
    counts = [_components(_mask(ds[i][0])) for i in range(len(ds))]
    assert counts == [t + 1 for t in ds.targets]


def test_orientation_label_is_the_arrow_direction():
    ds = SyntheticTask("orientation", num_samples=40, image_size=64)
    for i in range(len(ds)):
        img, label = ds[i]
        ys, xs = np.nonzero(_mask(img))
        cy, cx = ys.mean(), xs.mean()
        far = np.argmax((ys - cy) ** 2 + (xs - cx) ** 2)  # the tip is farthest from the centroid
        angle = math.degrees(math.atan2(ys[far] - cy, xs[far] - cx)) % 360
        diff = (angle - 45 * label + 180) % 360 - 180
        assert abs(diff) < 22.5, (i, label, angle)


def test_texture_stripes_have_one_orientation():
    """Stripes vary along one direction only: their colour structure tensor is coherent (~1);
    checks, grids and dots vary along two, so theirs is not (an independent measure)."""
    ds = SyntheticTask("texture", num_samples=72, image_size=64)

    def coherence(img):
        g = np.asarray(img, dtype=np.float32)
        gy, gx = np.gradient(g, axis=(0, 1))
        jxx, jyy, jxy = (gx * gx).sum(), (gy * gy).sum(), (gx * gy).sum()
        return np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy)

    by_class = {c: [] for c in ds.classes}
    for i in range(len(ds)):
        by_class[ds.classes[ds.targets[i]]].append(coherence(ds[i][0]))
    assert min(by_class["stripes"]) > 0.5
    assert max(by_class["checks"] + by_class["grid"] + by_class["dots"]) < 0.3


def test_works_with_timm_transforms():
    from timm.data import create_transform
    tf = create_transform(input_size=(3, 48, 48), crop_pct=1.0)
    ds = SyntheticTask("shapes", num_samples=4, image_size=32, transform=tf)
    x, y = ds[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and isinstance(y, int)


def test_holdout_split_is_a_deterministic_partition():
    ds = SyntheticTask("count", num_samples=1000)
    rest, val = holdout_split(ds, 0.2, seed=1)
    assert (len(rest), len(val)) == (800, 200)
    assert set(rest.indices).isdisjoint(val.indices) and len(set(rest.indices) | set(val.indices)) == 1000
    assert holdout_split(ds, 0.2, seed=1)[1].indices == val.indices
    assert holdout_split(ds, 0.2, seed=2)[1].indices != val.indices
    with pytest.raises(DataError, match="both must be at least 1"):
        holdout_split(SyntheticTask("count", num_samples=2), 0.1, seed=0)


def test_build_splits_for_a_task():
    s = build_splits("position", val_split=0.25, train_size=40, test_size=12, image_size=16)
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (30, 10, 12, 9)
    assert s.train[0][0].size == (16, 16)
    assert build_splits("position", train_size=10, val_size=5).val is not None
    assert build_splits("position", train_size=10).val is None
    with pytest.raises(DataError, match="exactly one data source"):
        build_splits()
    with pytest.raises(DataError, match="unknown task 'nope'.*count"):
        SyntheticTask("nope")


def _write_folder(root, splits):
    for split, classes in splits.items():
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 100, 50, 50)).save(d / f"{i}.png")


def test_image_folder_loads_matching_splits(tmp_path):
    _write_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    out = load_image_folder(tmp_path)
    assert sorted(out) == ["train", "val"] and out["train"].classes == ["cat", "dog"]
    s = build_splits(data_dir=tmp_path)
    assert len(s.train) == 4 and len(s.val) == 4 and s.test is None and s.classes == ["cat", "dog"]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    _write_folder(tmp_path / "a", {"val": ["x"]})
    with pytest.raises(DataError, match="no train/ folder"):
        load_image_folder(tmp_path / "a")
    _write_folder(tmp_path / "b", {"train": ["cat", "dog"], "test": ["cat", "bird"]})
    with pytest.raises(DataError, match=r"missing in test/: \['dog'\], only in test/: \['bird'\]"):
        load_image_folder(tmp_path / "b")
