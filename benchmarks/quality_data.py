"""The shared real photo sets with their ground truth, as retrieval tasks for the quality
benchmarks (`benchmarks.preprocessing`, `benchmarks.quality`).

A `Task` is a list of image files, the queries among them, and for each query the images
relevant to it; a query is left out of its own ranking.  The sets live in `../shared/data`
(see its README); they are never copied into the project.  Two sets are derived from them
and written under `benchmarks/out/quality-data/` (outside git):

- `holidays-upright`: Holidays with the white bars removed that the shared copy added beside
  its 116 portrait photos to fill a 4:3 frame, so portrait photos are portrait again.
- `varied-aspect`: every photo of holidays-upright and UKBench-56 cut to one of four shapes
  (9:16 portrait, square, 4:3 as shot, 5:2 panorama; centred crops), the shape turning within
  each group so that an image and the images relevant to it have different shapes.  The
  ground truth carries over (same scene or object = relevant).
"""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np

SHARED = os.environ.get(
    "IMGINDEX_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)
OUT = os.path.join(os.path.dirname(__file__), "out", "quality-data")
SHAPES = (("portrait-9x16", 9 / 16), ("square", 1.0), ("as-shot", None), ("panorama-5x2", 5 / 2))
TASKS = ("ukbench", "holidays", "holidays-upright", "varied-aspect", "cifar10")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    files: tuple[str, ...]  # image paths; the row order of every vector matrix
    queries: tuple[int, ...]  # rows that are queries
    relevant: tuple[frozenset[int], ...]  # per query: relevant rows (the query excluded)
    id_root: str = ""  # `imgindex build` ids are paths below this folder
    globs: tuple[str, ...] = ()  # --input globs matching exactly `files`

    def ids(self) -> list[str]:
        """The id `imgindex build` gives each file (its path below the glob's fixed prefix)."""
        return [os.path.relpath(f, self.id_root) for f in self.files]


def available() -> bool:
    return os.path.isdir(os.path.join(SHARED, "holidays"))


def load(name: str, cifar_per_class: int = 1000, cifar_queries_per_class: int = 100) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown set {name!r}; one of {list(TASKS)}")
    if not available():
        raise FileNotFoundError(f"the shared data is not at {SHARED} (see the project README)")
    if name == "ukbench":
        root = os.path.join(SHARED, "ukbench56", "images")
        return _with_globs(_groups_task(name, *_ukbench()), root, "*.jpg")
    if name == "holidays":
        return _holidays(os.path.join(SHARED, "holidays", "images"), name)
    if name == "holidays-upright":
        return _holidays(_upright_holidays(), name)
    if name == "varied-aspect":
        return _varied_aspect()
    return _cifar(cifar_per_class, cifar_queries_per_class)


def _groups_task(name: str, files: list[str], groups: list[str]) -> Task:
    """Every image a query; relevant = the other images of its group."""
    rows_of: dict[str, set[int]] = {}
    for row, group in enumerate(groups):
        rows_of.setdefault(group, set()).add(row)
    relevant = tuple(frozenset(rows_of[g] - {row}) for row, g in enumerate(groups))
    return Task(name, tuple(files), tuple(range(len(files))), relevant)


def _ukbench() -> tuple[list[str], list[str]]:
    root = os.path.join(SHARED, "ukbench56")
    with open(os.path.join(root, "groups.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f.readlines()[1:] if line.strip()]
    return [os.path.join(root, path) for path, _ in rows], [group for _, group in rows]


def _holidays_groups() -> tuple[list[str], list[str]]:
    names = sorted(os.listdir(os.path.join(SHARED, "holidays", "images")))
    return names, [n[:4] for n in names]


def _holidays(image_dir: str, name: str) -> Task:
    with open(os.path.join(SHARED, "holidays", "groundtruth.tsv")) as f:
        truth = [line.rstrip("\n").split("\t") for line in f.readlines()[1:] if line.strip()]
    names, _ = _holidays_groups()
    files = [os.path.join(image_dir, _stem_file(image_dir, n)) for n in names]
    row = {n: i for i, n in enumerate(names)}
    queries = tuple(row[q] for q, _ in truth)
    relevant = tuple(frozenset(row[r] for r in rel.split()) for _, rel in truth)
    return _with_globs(Task(name, tuple(files), queries, relevant), image_dir, "*.*")


def _with_globs(task: Task, id_root: str, *patterns: str) -> Task:
    return dataclasses.replace(task, id_root=id_root, globs=tuple(os.path.join(id_root, p) for p in patterns))


def _stem_file(image_dir: str, name: str) -> str:
    """Derived sets store every image as JPEG under the original stem."""
    if os.path.exists(os.path.join(image_dir, name)):
        return name
    return os.path.splitext(name)[0] + ".jpg"


def _cifar(per_class: int, queries_per_class: int) -> Task:
    """The first `per_class` images of each class (a multiple of 100, so that a glob selects
    them), the first `queries_per_class` of each are queries."""
    if per_class % 100 or not 100 <= per_class <= 1000:
        raise ValueError(f"cifar per_class must be a multiple of 100 from 100 to 1000, got {per_class}")
    root = os.path.join(SHARED, "cifar10-test")
    files, labels, queries = [], [], []
    for label in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
        chosen = sorted(glob.glob(os.path.join(root, label, "*.jpg")))[:per_class]
        queries.extend(range(len(files), len(files) + min(queries_per_class, len(chosen))))
        files.extend(chosen)
        labels.extend([label] * len(chosen))
    task = _groups_task("cifar10", files, labels)
    task = Task(task.name, task.files, tuple(queries), tuple(task.relevant[q] for q in queries))
    return _with_globs(task, root, f"*/0[0-{per_class // 100 - 1}]??.jpg")


def trim_white_bars(image):  # PIL.Image -> PIL.Image
    """Removes uniform near-white columns at the left and right edges (the shared Holidays
    copy pads portrait photos that way); an image without such bars is returned as is."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    white = (grey.min(axis=0) >= 235) & (grey.mean(axis=0) >= 250)
    left = int(np.argmin(white)) if not white.all() else 0
    right = int(np.argmin(white[::-1])) if not white.all() else 0
    if left + right < 0.05 * grey.shape[1]:
        return image
    return image.crop((left, 0, grey.shape[1] - right, grey.shape[0]))


def _upright_holidays() -> str:
    from PIL import Image

    out = os.path.join(OUT, "holidays-upright")
    names, _ = _holidays_groups()
    if _complete(out, len(names)):
        return out
    os.makedirs(out, exist_ok=True)
    for name in names:
        with Image.open(os.path.join(SHARED, "holidays", "images", name)) as image:
            trimmed = trim_white_bars(image.convert("RGB"))
            trimmed.save(os.path.join(out, os.path.splitext(name)[0] + ".jpg"), quality=95)
    _mark_complete(out, len(names))
    return out


def crop_to_shape(image, aspect: float | None):  # PIL.Image -> PIL.Image
    """Centred crop to width/height = aspect (None: unchanged)."""
    if aspect is None:
        return image
    width, height = image.size
    if width / height > aspect:
        new_width = max(1, round(height * aspect))
        left = (width - new_width) // 2
        return image.crop((left, 0, left + new_width, height))
    new_height = max(1, round(width / aspect))
    top = (height - new_height) // 2
    return image.crop((0, top, width, top + new_height))


def _varied_aspect() -> Task:
    from PIL import Image

    out = os.path.join(OUT, "varied-aspect")
    uk_files, uk_groups = _ukbench()
    upright = _upright_holidays()
    hol_names, hol_groups = _holidays_groups()
    sources = [
        (os.path.join(upright, _stem_file(upright, n)), "h" + g) for n, g in zip(hol_names, hol_groups)
    ]
    sources += [(f, "u" + g) for f, g in zip(uk_files, uk_groups)]
    files, groups, position = [], [], {}
    for index, (_, group) in enumerate(sources):
        turn = position.get(group, int(group[1:]) % len(SHAPES))
        position[group] = turn + 1
        shape, _ = SHAPES[turn % len(SHAPES)]
        files.append(os.path.join(out, f"{index:04d}-{shape}.jpg"))
        groups.append(group)
    if not _complete(out, len(files)):
        os.makedirs(out, exist_ok=True)
        for (path, _), target in zip(sources, files):
            aspect = dict(SHAPES)[_shape_of(target)]
            with Image.open(path) as image:
                crop_to_shape(image.convert("RGB"), aspect).save(target, quality=95)
        _mark_complete(out, len(files))
    return _with_globs(_groups_task("varied-aspect", files, groups), out, "*.jpg")


def _shape_of(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem.split("-", 1)[1]


def _complete(folder: str, count: int) -> bool:
    marker = os.path.join(folder, ".complete")
    return os.path.exists(marker) and open(marker).read().strip() == str(count)


def _mark_complete(folder: str, count: int) -> None:
    with open(os.path.join(folder, ".complete"), "w") as f:
        f.write(str(count))
