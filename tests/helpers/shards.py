"""Writers of small real input shards, each format by its real writer, good and bad records mixed.

Every builder returns the ids it expects embedded and the number of failure rows it expects.
"""

import io
import json
import os
import tarfile

from tests.helpers import images


def tfrecord_shard(path, items):
    """items: (features dict) -> one tf.train.Example each, written with tf.io.TFRecordWriter."""
    import tensorflow as tf

    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(float_list=tf.train.FloatList(value=[value]))

    with tf.io.TFRecordWriter(str(path)) as writer:
        for features in items:
            example = tf.train.Example(
                features=tf.train.Features(feature={k: feature(v) for k, v in features.items()})
            )
            writer.write(example.SerializeToString())


def webdataset_shard(path, samples):
    """samples: (key, {ext: bytes}) -> a tar with members key.ext, in WebDataset order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def mixed_dataset(root):
    """One TFRecord shard, one truncated TFRecord shard, one tar, one folder, with bad records.

    Returns (globs, expected embedded ids, expected failure rows, expected label by id).
    """
    root = str(root)
    os.makedirs(f"{root}/tfr", exist_ok=True)
    good, labels = [], {}
    items = []
    for i in range(5):
        items.append(
            {
                "image/encoded": images.jpeg(64 + 8 * i, 48, seed=i),
                "image/key": f"tf-{i}".encode(),
                "image/class/label": i,
            }
        )
        good.append(f"tf-{i}")
        labels[f"tf-{i}"] = i
    items.append({"image/encoded": images.cmyk_jpeg(), "image/source_id": b"tf-cmyk", "image/class/label": 7})
    good.append("tf-cmyk")
    labels["tf-cmyk"] = 7
    items.append({"image/encoded": images.exif_rotated_jpeg(), "image/filename": b"tf-rotated.jpg"})
    good.append("tf-rotated.jpg")
    items.append({"image/encoded": images.random_bytes(), "image/key": b"tf-random"})  # decode failure
    items.append({"image/format": b"jpeg", "image/key": b"tf-noimage"})  # read failure: no bytes
    items.append({"image/encoded": images.jpeg(seed=9)})  # no id feature: id = shard#index
    tfrecord_shard(f"{root}/tfr/a.tfrecord", items)
    good.append(f"{root}/tfr/a.tfrecord#9")

    tfrecord_shard(
        f"{root}/tfr/b.tfrecord",
        [{"image/encoded": images.jpeg(seed=20 + i), "image/key": f"tfb-{i}".encode()} for i in range(3)],
    )
    with open(f"{root}/tfr/b.tfrecord", "rb") as f:
        data = f.read()
    with open(f"{root}/tfr/b.tfrecord", "wb") as f:  # cut the third record in half
        f.write(data[: len(data) - 300])
    good += ["tfb-0", "tfb-1"]

    os.makedirs(f"{root}/wds", exist_ok=True)
    webdataset_shard(
        f"{root}/wds/shard-000.tar",
        [
            (
                "s/000",
                {"jpg": images.jpeg(seed=30), "cls": b"3", "json": json.dumps({"b": 1, "a": 2}).encode()},
            ),
            ("s/001", {"png": images.png16(), "txt": b"sixteen bit"}),
            ("s/002", {"json": b"{}"}),  # no image member
            ("s/003", {"png": images.palette_with_transparency(), "cls": b"4"}),
            ("s/004", {"png": images.huge_png()}),  # decompression bomb
            ("s/005", {"jpg": b""}),  # empty
            (
                "s/006",
                {"webp": images.encode(images.photo(), "WEBP"), "cls": b"x"},
            ),  # bad cls -> read failure
            ("s/007", {"jpeg": images.rgba_png()}),  # PNG bytes under a .jpeg name still decode
        ],
    )
    good += ["s/000", "s/001", "s/003", "s/007"]
    labels.update({"s/000": 3, "s/003": 4})

    os.makedirs(f"{root}/folder/sub", exist_ok=True)
    for name, data in {
        "a.jpg": images.jpeg(seed=40),
        "sub/b.png": images.la_png(),
        "sub/c.gif": images.multiframe_gif(),
        "empty.jpg": b"",
        "trunc.jpg": images.truncated_jpeg(),
    }.items():
        with open(f"{root}/folder/{name}", "wb") as f:
            f.write(data)
    good += ["a.jpg", "sub/b.png", "sub/c.gif"]

    globs = [f"{root}/tfr/*.tfrecord", f"{root}/wds/*.tar", f"{root}/folder"]
    # read: tf-noimage, b.tfrecord tail, s/002, s/006; decode: tf-random, s/004, s/005, empty.jpg, trunc.jpg
    return globs, good, 9, labels


def mixed_inputs(root, seed):
    """A WebDataset shard and a folder of distinct small photos."""
    os.makedirs(f"{root}/folder", exist_ok=True)
    webdataset_shard(
        f"{root}/w.tar", [(f"w{i}", {"jpg": images.jpeg(56, 44, seed=seed + i)}) for i in range(12)]
    )
    for i in range(12):
        with open(f"{root}/folder/f{i}.png", "wb") as f:
            f.write(images.encode(images.photo(40, 52, seed=seed + 100 + i), "PNG"))
    return [f"--input={root}/w.tar", f"--input={root}/folder"]
