"""The image folder of the fuzz corpus (`tests.helpers.fuzz`): hostile image files under
odd names, some above --max_record_bytes, among dot-named and non-image files to skip.
"""

from __future__ import annotations

from tests.helpers import images
from tests.helpers.fuzz_records import FAIL, MAX_RECORD_BYTES, Builder, write_file


def image_folder(b: Builder, root: str, scale: int) -> None:
    d = f"{root}/img"
    names = ["a", "ünïcödé-ファイル", "new\nline", "space name", "🙂", "UPPER"]
    exts = [".jpg", ".JPG", ".jpeg", ".png", ".PNG", ".webp", ".gif", ".bmp", ".tif", ".TIFF"]
    for i in range(450 * scale):
        name = f"{b.rng.choice(names)}-{b.uid('')}{b.rng.choice(exts)}"
        rel = f"sub{i % 3}/{name}" if i % 2 else name
        pick = b.rng.random()
        if pick < 0.04:  # above --max_record_bytes
            data, outcome, error, stage = (
                images.random_bytes(MAX_RECORD_BYTES + 1, i),
                FAIL,
                "RecordTooLarge",
                "read",
            )
        else:
            (data, outcome, error), stage = b.payload(), None
        write_file(f"{d}/{rel}", data)
        b.expect(f"{d}/{rel}", rel, outcome, f"{d}/{rel}", error, stage)
    for hidden in [".DS_Store", "._photo.jpg", ".git/objects/aa.jpg", "sub1/.thumbs/t.jpg", ".hidden.png"]:
        write_file(f"{d}/{hidden}", b.good())
        b.skipped_files["hidden"] += 1
    for other in ["notes.txt", "README", "data.bin", "sub2/Thumbs.db", "index.html", "photo.jpg.part"]:
        write_file(f"{d}/{other}", b"not an image\n")
        b.skipped_files["non_image"] += 1
