"""Image folders from strangers: never hang, follow no loops, name the file that fails.

Covers the ImageFolder trees of ``--data-dir`` (training and ``timm-peft eval``), timm's
``--dataset folder`` and the benchmark list layouts. A SIGALRM turns a hang into a failure.
"""
from __future__ import annotations

import io
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from timm_peft.data import DataError, build_splits, load_dataset_split, load_image
from timm_peft.train import evaluate_adapter


class Hung(BaseException):
    """Not an OSError, which os.walk and friends would swallow."""


@pytest.fixture(autouse=True)
def no_hang():
    def alarm(signum, frame):
        raise Hung("hung reading the data folder")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tree(root, splits=("train", "test"), classes=("a", "b"), per_class=3):
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"{i}.jpg").write_bytes(_jpeg(hash((split, c, i)) % 1000))
    return root


def test_a_fifo_named_like_an_image_is_refused_not_read(tmp_path):
    root = _tree(tmp_path / "data")
    fifo = root / "train" / "a" / "9.jpg"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=f"{fifo} is a FIFO, not an image file"):
        build_splits(data_dir=root)
    # swapped in after the folder was listed: the loader refuses it without blocking
    os.unlink(fifo)
    splits = build_splits(data_dir=root)
    victim = splits.train.samples[0][0]
    os.unlink(victim)
    os.mkfifo(victim)
    with pytest.raises(DataError, match=f"{victim} is a FIFO"):
        splits.train[0]
    with pytest.raises(DataError, match="/dev/null is a character device"):
        load_image("/dev/null")


def test_directory_link_loops_are_not_followed_and_nothing_counts_twice(tmp_path):
    root = _tree(tmp_path / "data")
    a = root / "train" / "a"
    (a / "loop").symlink_to(a)  # back to itself
    (a / "up").symlink_to(root / "train")  # to its parent (all classes)
    (a / "sub").mkdir()
    (a / "sub" / "back").symlink_to(a / "sub")
    (a / "sub" / "3.jpg").write_bytes(_jpeg(7))
    other = tmp_path / "elsewhere"  # a linked-in folder of more images is followed, once
    other.mkdir()
    (other / "4.jpg").write_bytes(_jpeg(8))
    (root / "train" / "b" / "more").symlink_to(other)
    (root / "train" / "b" / "more_again").symlink_to(other)
    s = build_splits(data_dir=root)
    files = [os.path.relpath(p, root / "train") for p, _ in s.train.samples]
    assert sorted(files) == ["a/0.jpg", "a/1.jpg", "a/2.jpg", "a/sub/3.jpg", "b/0.jpg",
                             "b/1.jpg", "b/2.jpg", "b/more/4.jpg"]
    assert [t for _, t in s.train.samples].count(0) == 4
    # timm's folder reader follows every link: such a tree is refused, naming the link
    with pytest.raises(DataError, match="leads to a folder already walked"):
        load_dataset_split("folder", root, "train")


def test_a_truncated_jpeg_fails_naming_the_file(tmp_path):
    root = _tree(tmp_path / "data")
    bad = root / "train" / "b" / "1.jpg"
    bad.write_bytes(_jpeg(3)[:200])
    s = build_splits(data_dir=root)
    index = [p for p, _ in s.train.samples].index(str(bad))
    with pytest.raises(DataError, match=f"cannot read image {bad}: .*(?i:truncated)"):
        s.train[index]
    assert s.train[0][0].size == (16, 16)  # the others read as before


def test_benchmark_lists_read_images_the_same_safe_way(tmp_path):
    folder = tmp_path / "fgvc" / "flowers"
    folder.mkdir(parents=True)
    (folder / "ok.jpg").write_bytes(_jpeg(1))
    os.mkfifo(folder / "fifo.jpg")
    for split in ("train", "val", "test"):
        (folder / f"{split}.json").write_text(json.dumps({"ok.jpg": 0, "fifo.jpg": 1}))
    ds, _ = load_dataset_split("fgvc/flowers", tmp_path / "fgvc", "train")
    assert ds[0][0].size == (16, 16)
    with pytest.raises(DataError, match="fifo.jpg is a FIFO"):
        ds[1]


def test_eval_data_dir_names_a_fifo_instead_of_hanging(tmp_path):
    import timm
    import timm_peft
    torch.manual_seed(0)
    model = timm.create_model("resnet10t.bias", num_classes=2, pretrained=False, channels=(8, 16, 16, 16),
                              stem_width=8)
    adapter = timm_peft.save_pretrained(model, tmp_path / "adapter")
    root = _tree(tmp_path / "data")
    fifo = root / "test" / "b" / "7.png"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=f"{fifo} is a FIFO"):
        evaluate_adapter(adapter, "test", data_dir=str(root))
