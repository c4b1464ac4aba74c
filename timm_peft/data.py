"""Datasets for fine-tuning: generated VTAB-style tasks, ImageFolder trees, timm datasets and
the benchmark layouts of the PEFT papers (VTAB-1k list files, VPT's FGVC json splits).

The generated tasks need no download and are deterministic: image ``i`` of a split is drawn from
its own random stream seeded by ``(task, seed, split, i)``, so any subset, any order and any
number of loader workers see the same pixels. Like VTAB (Zhai et al. 2019, "A Large-scale Study
of Representation Learning with the Visual Task Adaptation Benchmark") they come in two kinds:

* *structured* tasks, whose label is a geometric property of the scene (VTAB's dSprites/location,
  dSprites/orientation and CLEVR/count): ``position``, ``orientation``, ``count``;
* *natural-like* tasks, whose label is an appearance category (VTAB's DTD, Caltech101):
  ``texture`` and ``shapes``. ``shapes`` is meant for pre-training a backbone that the other
  tasks then transfer from.

Every dataset returns ``(PIL.Image, int)`` like ``torchvision.datasets.ImageFolder``, so timm's
``create_transform`` applies unchanged, and exposes ``classes`` and ``targets``.
"""
from __future__ import annotations

import math
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, Subset

__all__ = ["TASKS", "TaskSpec", "SyntheticTask", "list_tasks", "load_image_folder", "DataError",
           "DataSplits", "build_splits", "holdout_split", "TransformDataset", "VTAB1K_TASKS",
           "FGVC_DATASETS", "ListDataset", "load_dataset_split", "check_dataset_name", "load_image",
           "check_image_tree"]

Rng = np.random.Generator
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class DataError(ValueError):
    """A dataset cannot be found or read, or its splits disagree."""


# ----------------------------------------------------------------------------------------------
# drawing primitives
# ----------------------------------------------------------------------------------------------

SHAPES = ("circle", "triangle", "square", "pentagon", "hexagon", "star", "cross", "ring")


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius ``r`` centred at ``(cx, cy)``, rotated by ``angle``."""
    if kind in ("triangle", "square", "pentagon", "hexagon"):
        n = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[kind]
        pts = [(math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n)) for k in range(n)]
    elif kind == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(math.pi * k / 5),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(math.pi * k / 5)) for k in range(10)]
    elif kind == "cross":
        a, b = 1.0, 0.35
        pts = [(b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a), (-b, -b), (-a, -b), (-a, b),
               (-b, b), (-b, a), (b, a)]
    elif kind == "arrow":
        # a thin isosceles triangle pointing along +x: its direction is defined over 360 degrees
        pts = [(1.0, 0.0), (-0.6, 0.35), (-0.6, -0.35)]
    else:
        raise ValueError(f"no polygon for shape {kind!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
                angle: float, color: tuple[int, int, int]) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(1, round(0.35 * r)))
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=color)


def _color(rng: Rng, lo: int = 40, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def _smooth_noise(rng: Rng, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random ``cells`` x ``cells`` grid, bilinearly upsampled."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255


def _natural_background(rng: Rng, size: int) -> np.ndarray:
    """A float HxWx3 image in [0, 255]: a colour gradient with soft blotches (clutter)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    theta = rng.uniform(0, 2 * math.pi)
    t = (x * math.cos(theta) + y * math.sin(theta) + 1.5) / 3
    c0, c1, c2 = (np.array(_color(rng, 0, 256), np.float32) for _ in range(3))
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    blot = _smooth_noise(rng, size, int(rng.integers(3, 7)))[..., None]
    return img * (1 - 0.5 * blot) + c2 * 0.5 * blot


def _plain_background(rng: Rng, size: int) -> np.ndarray:
    """A dark, slightly uneven background for the structured (dSprites/CLEVR-like) tasks."""
    base = rng.uniform(0, 60)
    return np.full((size, size, 3), base, np.float32) + 30 * _smooth_noise(rng, size, 3)[..., None]


def _finish(canvas: Image.Image, size: int, rng: Rng, noise: float) -> Image.Image:
    """Downsample a supersampled canvas (anti-aliasing) and add pixel noise."""
    img = np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32)
    img = img + rng.normal(0, noise, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _supersample(size: int) -> int:
    return 4 if size <= 64 else 2 if size <= 128 else 1


def _canvas(background: np.ndarray, ss: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    size = background.shape[0]
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    canvas = canvas.resize((size * ss, size * ss), Image.BILINEAR)
    return canvas, ImageDraw.Draw(canvas)


# ----------------------------------------------------------------------------------------------
# tasks: render(rng, label, size) -> PIL image
# ----------------------------------------------------------------------------------------------

def _render_shapes(rng: Rng, label: int, size: int) -> Image.Image:
    ss = _supersample(size)
    background = _natural_background(rng, size)
    canvas, draw = _canvas(background, ss)
    S = size * ss
    r = rng.uniform(0.18, 0.32) * S
    cx, cy = rng.uniform(r, S - r, size=2)
    color = _color(rng)
    if np.abs(np.array(color) - background.mean((0, 1))).sum() < 150:  # keep the shape visible
        color = tuple(255 - c for c in color)
    _draw_shape(draw, SHAPES[label], cx, cy, r, rng.uniform(0, 2 * math.pi), color)
    return _finish(canvas, size, rng, noise=6)


_GRID = 3
_POSITIONS = tuple(f"{row}-{col}" for row in ("top", "middle", "bottom")
                   for col in ("left", "centre", "right"))


def _render_position(rng: Rng, label: int, size: int) -> Image.Image:
    ss = _supersample(size)
    canvas, draw = _canvas(_plain_background(rng, size), ss)
    S, cell = size * ss, size * ss / _GRID
    r = rng.uniform(0.07, 0.11) * S
    row, col = divmod(label, _GRID)
    # the centre stays inside its cell, and the whole shape inside the image
    cx = rng.uniform(max(col * cell, r), min((col + 1) * cell, S - r))
    cy = rng.uniform(max(row * cell, r), min((row + 1) * cell, S - r))
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    _draw_shape(draw, kind, cx, cy, r, rng.uniform(0, 2 * math.pi), _color(rng, 150))
    return _finish(canvas, size, rng, noise=4)


_NUM_ANGLES = 8


def _render_orientation(rng: Rng, label: int, size: int) -> Image.Image:
    ss = _supersample(size)
    canvas, draw = _canvas(_plain_background(rng, size), ss)
    S = size * ss
    r = rng.uniform(0.2, 0.32) * S
    cx, cy = rng.uniform(r, S - r, size=2)
    jitter = rng.uniform(-0.3, 0.3) * (math.pi / _NUM_ANGLES)
    angle = 2 * math.pi * label / _NUM_ANGLES + jitter
    draw.polygon(_polygon("arrow", cx, cy, r, angle), fill=_color(rng, 150))
    return _finish(canvas, size, rng, noise=4)


_MAX_COUNT = 6


def _render_count(rng: Rng, label: int, size: int) -> Image.Image:
    ss = _supersample(size)
    canvas, draw = _canvas(_plain_background(rng, size), ss)
    S = size * ss
    placed: list[tuple[float, float, float]] = []
    while len(placed) < label + 1:
        r = rng.uniform(0.06, 0.09) * S
        cx, cy = rng.uniform(r, S - r, size=2)
        # rejection sampling keeps objects apart, so every object stays countable
        if all(math.hypot(cx - x, cy - y) > 1.15 * (r + q) for x, y, q in placed):
            placed.append((cx, cy, r))
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            _draw_shape(draw, kind, cx, cy, r, rng.uniform(0, 2 * math.pi), _color(rng, 120))
    return _finish(canvas, size, rng, noise=4)


TEXTURES = ("stripes", "checks", "dots", "waves", "grid", "blotches")


def _render_texture(rng: Rng, label: int, size: int) -> Image.Image:
    ss = 2 if size <= 128 else 1
    S = size * ss
    y, x = np.mgrid[0:S, 0:S].astype(np.float32) / S
    theta = rng.uniform(0, math.pi)
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    f = rng.uniform(3, 6)  # periods per image
    phase_u, phase_v = rng.uniform(0, 1, size=2)
    kind = TEXTURES[label]
    if kind == "stripes":
        m = np.sin(2 * math.pi * (f * u + phase_u)) > 0
    elif kind == "checks":
        m = (np.sin(2 * math.pi * (f * u + phase_u)) > 0) ^ (np.sin(2 * math.pi * (f * v + phase_v)) > 0)
    elif kind == "dots":
        du = (f * u + phase_u) % 1 - 0.5
        dv = (f * v + phase_v) % 1 - 0.5
        m = du ** 2 + dv ** 2 < rng.uniform(0.06, 0.12)
    elif kind == "waves":
        amp = rng.uniform(0.04, 0.08)
        m = np.sin(2 * math.pi * (f * (u + amp * np.sin(2 * math.pi * 2 * v)) + phase_u)) > 0
    elif kind == "grid":
        w = rng.uniform(0.12, 0.2)
        m = ((f * u + phase_u) % 1 < w) | ((f * v + phase_v) % 1 < w)
    else:
        m = _smooth_noise(rng, S, int(rng.integers(4, 8))) > 0.5
    c0, c1 = np.array(_color(rng, 0, 256), np.float32), np.array(_color(rng, 0, 256), np.float32)
    if np.abs(c0 - c1).sum() < 120:  # keep the pattern visible
        c1 = 255 - c0
    img = np.where(m[..., None], c1, c0) * rng.uniform(0.7, 1.0)
    return _finish(Image.fromarray(img.astype(np.uint8)), size, rng, noise=8)


@dataclass(frozen=True)
class TaskSpec:
    """A generated task: its classes, its renderer and the VTAB task it imitates."""

    name: str
    classes: tuple[str, ...]
    render: Callable[[Rng, int, int], Image.Image]
    kind: str
    analogue: str
    description: str


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("position", _POSITIONS, _render_position, "structured", "dSprites/location",
             "which cell of a 3x3 grid holds the centre of a single shape"),
    TaskSpec("orientation", tuple(f"{a}deg" for a in range(0, 360, 360 // _NUM_ANGLES)),
             _render_orientation, "structured", "dSprites/orientation",
             "the direction an arrow head points to, in 8 bins of 45 degrees"),
    TaskSpec("count", tuple(str(n) for n in range(1, _MAX_COUNT + 1)), _render_count,
             "structured", "CLEVR/count", "how many separate shapes (1 to 6) the image holds"),
    TaskSpec("texture", TEXTURES, _render_texture, "natural", "DTD",
             "which of 6 periodic or random textures fills the image, in random colours"),
    TaskSpec("shapes", SHAPES, _render_shapes, "natural", "Caltech101",
             "which of 8 shapes appears on a cluttered background (for pre-training)"),
)}


def list_tasks() -> list[str]:
    """Names of the built-in generated tasks.

    Example:
        >>> list_tasks()
        ['count', 'orientation', 'position', 'shapes', 'texture']
    """
    return sorted(TASKS)


#: VTAB-1k sizes: 1000 training images (800 train + 200 val for tuning); our test split size
DEFAULT_SIZES = {"train": 1000, "val": 200, "test": 500}


class SyntheticTask(Dataset):
    """A procedurally generated image-classification task (no download, deterministic).

    Labels are balanced and shuffled; image ``i`` depends only on ``(name, seed, split, i)``.
    Rendered images are kept in memory (``cache=True``), as a generated task is small and
    rendering costs more than a training step of a tiny model.

    Example:
        >>> ds = SyntheticTask("count", split="train", num_samples=12, image_size=32)
        >>> img, label = ds[0]
        >>> img.size, ds.classes[label] in ds.classes, len(ds)
        ((32, 32), True, 12)
    """

    def __init__(self, name: str, split: str = "train", num_samples: int | None = None,
                 image_size: int = 32, seed: int = 0,
                 transform: Callable[[Image.Image], Any] | None = None,
                 target_transform: Callable[[int], Any] | None = None,
                 cache: bool = True) -> None:
        if name not in TASKS:
            raise DataError(f"unknown task {name!r}; built-in tasks: {list_tasks()}")
        if split not in _SPLIT_CODES:
            raise DataError(f"unknown split {split!r}; allowed: {list(_SPLIT_CODES)}")
        num_samples = DEFAULT_SIZES[split] if num_samples is None else num_samples
        if not isinstance(num_samples, int) or num_samples < 1:
            raise DataError(f"num_samples must be a positive integer, got {num_samples!r}")
        if not isinstance(image_size, int) or image_size < 8:
            raise DataError(f"image_size must be an integer >= 8, got {image_size!r}")
        self.spec = TASKS[name]
        self.name, self.split, self.image_size, self.seed = name, split, image_size, seed
        self.classes = list(self.spec.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform, self.target_transform = transform, target_transform
        self._key = (zlib.crc32(name.encode()), seed, _SPLIT_CODES[split])
        labels = np.arange(num_samples) % len(self.classes)
        self.targets = [int(t) for t in np.random.default_rng(self._key).permutation(labels)]
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.targets)

    def render(self, index: int) -> Image.Image:
        """The image at ``index`` (before any transform)."""
        if self._cache is not None and index in self._cache:
            return Image.fromarray(self._cache[index])
        rng = np.random.default_rng((*self._key, index))
        img = self.spec.render(rng, self.targets[index], self.image_size)
        if self._cache is not None:
            self._cache[index] = np.asarray(img)
        return img

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        img, target = self.render(index), self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __repr__(self) -> str:
        return (f"SyntheticTask({self.name!r}, split={self.split!r}, num_samples={len(self)}, "
                f"image_size={self.image_size}, seed={self.seed})")


# ----------------------------------------------------------------------------------------------
# ImageFolder trees
# ----------------------------------------------------------------------------------------------

# Image folders come from users and from strangers' archives: reading one never hangs (a FIFO
# or device named like an image is refused, and images are opened without blocking), follows no
# directory loop (a folder is walked once, so no image is counted twice), and every failure names
# the file.

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def _not_regular(path: str, mode: int) -> DataError:
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return DataError(f"{path} is {kind}, not an image file: an image folder holds regular image "
                     "files only; remove it")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read one image as RGB; a clear :class:`DataError` naming ``path`` for anything else.

    The file is opened without blocking and checked to be a regular file before a byte is read
    (a FIFO in place of an image would otherwise hang the loader), and decoded in full here so
    a truncated file fails now, with its name.

    Example:
        >>> load_image("/dev/null")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        timm_peft.data.DataError: /dev/null is a character device, not an image file: ...
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"cannot open image {path}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(str(path), mode)
        try:
            with Image.open(fh) as img:
                return img.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {path}: {e}") from e


def _image_files(top: str, extensions: tuple[str, ...], seen: set[tuple[int, int]],
                 reserved: set[tuple[int, int]]) -> list[str]:
    """Image files under ``top``, in ``torchvision``'s order (sorted folders, sorted names).

    Links to folders are followed, but never into a folder already walked (``seen``: a loop, or
    a folder reached twice) or into another class's folder (``reserved``).
    """
    found: dict[str, list[str]] = {}
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            raise DataError(f"cannot read folder {folder}: {e.strerror}") from e
        names = found.setdefault(folder, [])
        for entry in entries:
            is_image = entry.name.lower().endswith(extensions)
            try:
                st = os.stat(entry.path)  # follows links
            except OSError as e:
                if is_image:
                    raise DataError(f"cannot read image {entry.path}: {e.strerror} (a broken "
                                    "link?)") from e
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key not in seen and key not in reserved:
                    seen.add(key)
                    stack.append(entry.path)
            elif is_image:
                if not stat.S_ISREG(st.st_mode):
                    raise _not_regular(entry.path, st.st_mode)
                names.append(entry.name)
    return [os.path.join(folder, n) for folder in sorted(found) for n in sorted(found[folder])]


def _scan_classes(directory: str, class_to_idx: dict[str, int], extensions: tuple[str, ...],
                  allow_empty: bool = False) -> list[tuple[str, int]]:
    roots = {c: os.path.join(directory, c) for c in class_to_idx}
    ids = {}
    for c, root in roots.items():
        st = os.stat(root)
        ids[c] = (st.st_dev, st.st_ino)
    seen: set[tuple[int, int]] = set()
    out, empty = [], []
    for c in sorted(class_to_idx):
        seen.add(ids[c])
        files = _image_files(roots[c], extensions, seen, set(ids.values()) - {ids[c]})
        out += [(f, class_to_idx[c]) for f in files]
        if not files:
            empty.append(c)
    if empty and not allow_empty:
        raise FileNotFoundError(f"found no image ({', '.join(extensions)}) in the class folders "
                                f"{empty}")
    return out


def _image_folder(path: str) -> Dataset:
    """``torchvision.datasets.ImageFolder`` that cannot hang, loop or read an image unnamed."""
    from torchvision.datasets import ImageFolder

    class SafeImageFolder(ImageFolder):
        @staticmethod
        def make_dataset(directory: Any, class_to_idx: dict[str, int],
                         extensions: tuple[str, ...] | None = None,
                         is_valid_file: Any = None, allow_empty: bool = False) -> list:
            from torchvision.datasets.folder import IMG_EXTENSIONS
            return _scan_classes(str(directory), class_to_idx, extensions or IMG_EXTENSIONS,
                                 allow_empty)

    return SafeImageFolder(path, loader=load_image)


def check_image_tree(root: str | os.PathLike) -> None:
    """Refuse a folder that a reader following links would walk forever or count twice
    (a link to a folder already walked) or that holds non-regular files named like images."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    top = os.fspath(root)
    seen: set[tuple[int, int]] = set()
    st = os.stat(top)
    seen.add((st.st_dev, st.st_ino))
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            raise DataError(f"cannot read folder {folder}: {e.strerror}") from e
        for entry in entries:
            try:
                st = os.stat(entry.path)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    raise DataError(f"{entry.path} leads to a folder already walked (a link "
                                    f"loop?) in {top}; remove the link so no image is read twice")
                seen.add(key)
                stack.append(entry.path)
            elif entry.name.lower().endswith(IMG_EXTENSIONS) and not stat.S_ISREG(st.st_mode):
                raise _not_regular(entry.path, st.st_mode)

def load_image_folder(root: str | os.PathLike, splits: Sequence[str] = ("train", "val", "test"),
                      required: Sequence[str] = ("train",)) -> dict[str, Dataset]:
    """Read ``root/<split>/<class>/<image>`` trees; every split must hold the same class folders.

    Splits in ``required`` must exist; the others are returned when present.

    Example:
        >>> dsets = load_image_folder("my_data")  # doctest: +SKIP
        >>> dsets["train"].classes  # doctest: +SKIP
        ['cat', 'dog']
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist (expected {root}/train/<class>/"
                        "<image> and optionally val/ and test/ laid out the same way)")
    out: dict[str, Dataset] = {}
    for split in splits:
        path = root / split
        if not path.is_dir():
            if split in required:
                present = sorted(p.name for p in root.iterdir() if p.is_dir())
                raise DataError(f"{root} has no {split}/ folder (found {present}); expected "
                                f"{root}/{split}/<class>/<image>")
            continue
        try:
            out[split] = _image_folder(str(path))
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"cannot read image folder {path}: {e}") from e
    reference = next(iter(out))
    ref_classes = set(out[reference].classes)
    for split, ds in out.items():
        classes = set(ds.classes)
        if classes != ref_classes:
            raise DataError(
                f"class folders differ between {root / reference} and {root / split}: "
                f"missing in {split}/: {sorted(ref_classes - classes)}, only in {split}/: "
                f"{sorted(classes - ref_classes)}; every split must hold the same classes")
    return out


# ----------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------

@dataclass
class DataSplits:
    """Untransformed train / validation / test datasets and the class names they share."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classes: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def holdout_split(dataset: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Split ``dataset`` at random into ``(rest, held_out)`` with ``round(fraction*n)`` held out.

    This is how VTAB-1k's 800/200 and FGVC's 90/10 tuning splits are drawn from the training set.

    Example:
        >>> rest, val = holdout_split(SyntheticTask("count", num_samples=1000), 0.2, seed=0)
        >>> len(rest), len(val)
        (800, 200)
    """
    n = len(dataset)
    n_val = round(fraction * n)
    if not 0 < n_val < n:
        raise DataError(f"a validation fraction of {fraction} leaves {n - n_val} training and "
                        f"{n_val} validation images out of {n}; both must be at least 1")
    perm = np.random.default_rng(seed).permutation(n).tolist()
    return Subset(dataset, sorted(perm[n_val:])), Subset(dataset, sorted(perm[:n_val]))


def build_splits(task: str | None = None, data_dir: str | os.PathLike | None = None, *,
                 val_split: float = 0.0, seed: int = 0, image_size: int = 32,
                 train_size: int | None = None, val_size: int = 0,
                 test_size: int | None = None, dataset: str | None = None,
                 train_split: str = "train", val_split_name: str | None = None,
                 test_split: str | None = "test", download: bool = False) -> DataSplits:
    """Train / validation / test sets from a built-in ``task``, an ImageFolder ``data_dir`` or a
    named ``dataset`` (see :func:`load_dataset_split`) rooted at ``data_dir``.

    The validation set is held out of the training set when ``val_split > 0`` (VTAB-1k tuning:
    0.2, FGVC: 0.1); otherwise it is the dataset's ``val_split_name`` split, ``data_dir/val``
    (or the task's ``val`` split when ``val_size > 0``), if any. Generated tasks draw the split
    seed from ``seed`` too.

    Example:
        >>> s = build_splits("orientation", val_split=0.2, train_size=100, test_size=20)
        >>> len(s.train), len(s.val), len(s.test), s.num_classes
        (80, 20, 20, 8)
    """
    if (task is None) == (data_dir is None and dataset is None):
        raise DataError("give exactly one data source: a built-in task "
                        f"({list_tasks()}), an ImageFolder directory or a dataset name")
    if not 0 <= val_split < 1:
        raise DataError(f"val_split must be in [0, 1), got {val_split}")
    if dataset is not None:
        load = lambda split, training=False: load_dataset_split(  # noqa: E731
            dataset, data_dir, split, is_training=training, download=download)
        train, classes = load(train_split, True)
        val = test = None
        for split_name, which in ((val_split_name, "val"), (test_split, "test")):
            if split_name is None:
                continue
            ds, other = load(split_name)
            if other != classes:
                raise DataError(f"dataset {dataset!r}: the classes of split {split_name!r} differ "
                                f"from those of {train_split!r} ({other[:6]}… vs {classes[:6]}…)")
            val, test = (ds, test) if which == "val" else (val, ds)
        if val_split > 0:
            train, val = holdout_split(train, val_split, seed)
        return DataSplits(train=train, val=val, test=test, classes=list(classes),
                          source=f"{dataset}:{data_dir}" if data_dir is not None else dataset)
    if task is not None:
        make = lambda split, n: SyntheticTask(task, split, n, image_size=image_size, seed=seed)  # noqa: E731
        train, test = make("train", train_size), make("test", test_size)
        val = make("val", val_size) if val_size else None
        classes, source = train.classes, f"task:{task}"
    else:
        dsets = load_image_folder(data_dir)
        train, val, test = dsets["train"], dsets.get("val"), dsets.get("test")
        classes, source = train.classes, str(data_dir)
    if val_split > 0:
        train, val = holdout_split(train, val_split, seed)
    return DataSplits(train=train, val=val, test=test, classes=list(classes), source=source)


class TransformDataset(Dataset):
    """``dataset`` with ``transform`` applied to each image (datasets here return raw images)."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any] | None) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img, target = self.dataset[index]
        return (self.transform(img) if self.transform is not None else img), target


# ----------------------------------------------------------------------------------------------
# timm datasets and the benchmark layouts of the PEFT papers
# ----------------------------------------------------------------------------------------------

#: VTAB-1k (Zhai et al. 2019) in the folder layout the PEFT papers' code reads
#: (``<root>/<task>/{train800,val200,train800val200,test}.txt``): task -> (group, classes)
VTAB1K_TASKS: dict[str, tuple[str, int]] = {
    "cifar": ("natural", 100), "caltech101": ("natural", 102), "dtd": ("natural", 47),
    "oxford_flowers102": ("natural", 102), "oxford_iiit_pet": ("natural", 37),
    "svhn": ("natural", 10), "sun397": ("natural", 397),
    "patch_camelyon": ("specialized", 2), "eurosat": ("specialized", 10),
    "resisc45": ("specialized", 45), "diabetic_retinopathy": ("specialized", 5),
    "clevr_count": ("structured", 8), "clevr_dist": ("structured", 6), "dmlab": ("structured", 6),
    "kitti": ("structured", 4), "dsprites_loc": ("structured", 16),
    "dsprites_ori": ("structured", 16), "smallnorb_azi": ("structured", 18),
    "smallnorb_ele": ("structured", 9),
}
VTAB1K_SPLITS = ("train800", "val200", "train800val200", "test")

#: FGVC (as benchmarked by VPT, Jia et al. 2022, Sec. 4.1): name -> (image folder inside
#: ``<root>/<name>/``, number of classes). Each ``<root>/<name>/`` holds VPT's split files
#: ``train.json``, ``val.json`` (its random 90/10 split of the official training set where no
#: official validation set exists) and ``test.json``, each mapping ``relative/path`` -> label.
FGVC_DATASETS: dict[str, tuple[str, int]] = {
    "cub": ("images", 200), "nabirds": ("images", 555), "flowers": ("", 102),
    "dogs": ("Images", 120), "cars": ("", 196),
}
FGVC_SPLITS = ("train", "val", "test")
_STREAMING = ("wds", "hfids", "tfds")


def check_dataset_name(name: str, root: str | os.PathLike | None) -> None:
    """Refuse a ``--dataset`` this library cannot train on, saying what is allowed.

    Example:
        >>> check_dataset_name("vtab1k/nope", "data")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        timm_peft.data.DataError: unknown VTAB-1k task 'nope'; tasks: ['caltech101', ...]
    """
    prefix, sep, rest = name.partition("/")
    prefix = prefix.lower() if sep else ""
    if prefix in _STREAMING:
        raise DataError(f"dataset {name!r} is a streaming (iterable) dataset; training here needs "
                        "random access (a held-out split, a sampler per process): use folder, "
                        "torch/<name>, hfds/<name>, vtab1k/<task> or fgvc/<name>")
    if prefix == "vtab1k" and rest not in VTAB1K_TASKS:
        raise DataError(f"unknown VTAB-1k task {rest!r}; tasks: {sorted(VTAB1K_TASKS)}")
    if prefix == "fgvc" and rest not in FGVC_DATASETS:
        raise DataError(f"unknown FGVC dataset {rest!r}; datasets: {sorted(FGVC_DATASETS)}")
    if prefix in ("", "vtab1k", "fgvc", "torch") and root is None:
        raise DataError(f"dataset {name!r} needs its root directory (--data-dir)")


class ListDataset(Dataset):
    """Images listed as ``(relative path, label)`` under ``root``; returns ``(PIL.Image, int)``.

    The form of the VTAB-1k list files and of VPT's FGVC json splits.
    """

    def __init__(self, root: str | os.PathLike, items: Sequence[tuple[str, int]],
                 classes: Sequence[str], source: str) -> None:
        self.root, self.items, self.classes = Path(root), list(items), list(classes)
        self.targets = [label for _, label in self.items]
        bad = sorted({t for t in self.targets if not 0 <= t < len(self.classes)})
        if bad:
            raise DataError(f"{source}: labels {bad[:8]} are outside 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        rel, label = self.items[index]
        return load_image(self.root / rel), label


def _read_vtab_list(path: Path) -> list[tuple[str, int]]:
    if not path.is_file():
        raise DataError(f"missing VTAB-1k split file {path} (expected {', '.join(VTAB1K_SPLITS)}"
                        " .txt in each task folder, lines 'relative/path label')")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rel, _, label = line.strip().rpartition(" ")
        if not rel or not label.lstrip("-").isdigit():
            raise DataError(f"{path}:{n}: expected 'relative/path label', got {line!r}")
        items.append((rel, int(label)))
    return items


def _read_fgvc_json(path: Path) -> dict[str, int]:
    import json
    if not path.is_file():
        raise DataError(f"missing FGVC split file {path} (expected VPT's train.json, val.json and "
                        "test.json mapping 'relative/path' to a label)")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise DataError(f"{path} must map 'relative/path' to an integer label")
    return data


def _benchmark_split(kind: str, name: str, root: Path, split: str) -> ListDataset:
    """A split (``a+b`` joins splits) of a VTAB-1k task or an FGVC dataset."""
    parts = split.split("+")
    if kind == "vtab1k":
        allowed, folder = VTAB1K_SPLITS, root / name
        classes = [str(i) for i in range(VTAB1K_TASKS[name][1])]
        image_root = folder
    else:
        allowed, folder = FGVC_SPLITS, root / name
        image_root = folder / FGVC_DATASETS[name][0]
    bad = [p for p in parts if p not in allowed]
    if bad:
        raise DataError(f"{kind}/{name} has no split {bad[0]!r}; splits: {list(allowed)} "
                        "(join with '+', e.g. train+val)")
    if not folder.is_dir():
        raise DataError(f"{kind}/{name}: folder {folder} does not exist")
    items: list[tuple[str, int]] = []
    if kind == "vtab1k":
        for p in parts:
            items += _read_vtab_list(folder / f"{p}.txt")
    else:
        # VPT's labels need not be contiguous (NABirds): classes are the sorted labels of train
        train = _read_fgvc_json(folder / "train.json")
        labels = sorted(set(train.values()))
        index = {lab: i for i, lab in enumerate(labels)}
        classes = [str(lab) for lab in labels]
        for p in parts:
            data = train if p == "train" else _read_fgvc_json(folder / f"{p}.json")
            unknown = sorted(set(data.values()) - set(index))
            if unknown:
                raise DataError(f"{folder / (p + '.json')}: labels {unknown[:8]} do not occur in "
                                "train.json")
            items += [(rel, index[lab]) for rel, lab in data.items()]
    return ListDataset(image_root, items, classes, f"{kind}/{name}[{split}]")


def _classes_of(ds: Any, name: str) -> list[str]:
    reader = getattr(ds, "reader", None)
    mapping = getattr(reader, "class_to_idx", None) or getattr(ds, "class_to_idx", None)
    if mapping:
        return [str(c) for c, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    if getattr(ds, "classes", None):
        return [str(c) for c in ds.classes]
    raise DataError(f"dataset {name!r} names no classes (no class_to_idx or classes)")


def load_dataset_split(name: str, root: str | os.PathLike | None, split: str, *,
                       is_training: bool = False, download: bool = False,
                       ) -> tuple[Dataset, list[str]]:
    """One split of a named dataset and its class names: ``vtab1k/<task>``, ``fgvc/<name>``, or
    anything :func:`timm.data.create_dataset` reads with random access (folder, ``torch/``,
    ``hfds/``).

    Example:
        >>> ds, classes = load_dataset_split("vtab1k/dtd", "vtab-1k", "train800")  # doctest: +SKIP
        >>> len(ds), len(classes)  # doctest: +SKIP
        (800, 47)
    """
    check_dataset_name(name, root)
    prefix, sep, rest = name.partition("/")
    prefix = prefix.lower() if sep else ""
    if prefix in ("vtab1k", "fgvc"):
        ds = _benchmark_split(prefix, rest, Path(root), split)  # type: ignore[arg-type]
        return ds, ds.classes
    from timm.data import create_dataset
    if prefix == "":
        if name.lower() not in ("", "folder", "imagefolder"):
            raise DataError(f"unknown dataset {name!r}: use folder, torch/<name>, hfds/<name>, "
                            "vtab1k/<task> or fgvc/<name>")
        # timm falls back to the root itself when <root>/<split> is missing: refuse instead
        if not (Path(root) / split).is_dir():  # type: ignore[arg-type]
            raise DataError(f"folder dataset {root} has no {split}/ folder")
        check_image_tree(Path(root) / split)  # timm's reader follows every link
        name = ""
    try:
        ds = create_dataset(name, root=None if root is None else str(root), split=split,
                            is_training=is_training, download=download)
    except ImportError as e:
        raise DataError(f"dataset {name!r} needs a package that is not installed: {e}") from e
    except (AssertionError, FileNotFoundError, RuntimeError) as e:
        raise DataError(f"cannot load dataset {name!r} split {split!r} from {root}: {e}") from e
    return ds, _classes_of(ds, name)
