"""The embedded default job (`imgindex demo`, what `make run` runs).

Real photographs that scikit-image ships are augmented into variants (crop, flip, small
rotation, colour change, JPEG re-encode) and written as WebDataset shards, so each
original photo has known relevant images.  `imgindex build` embeds the shards with the
builtin model, builds and validates the ScaNN index and publishes the run; the original
photos (not in the index) are then sent as image queries to the serving `Searcher`, and the
hit rate (a photo's variants found in its top hits) is printed and drawn as a contact sheet.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import shutil
import tarfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from retrieval import imaging
from retrieval.errors import ConfigError

# Colour and greyscale photographs bundled inside the scikit-image wheel (no download).
PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)


def photo_dir() -> str:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the demo photos come from scikit-image: pip install 'imgindex[demo]'")
    return os.path.join(spec.submodule_search_locations[0], "data")


def originals() -> dict[str, bytes]:
    """Photo name -> its encoded bytes as shipped."""
    out = {}
    for name in PHOTOS:
        with open(os.path.join(photo_dir(), name), "rb") as f:
            out[os.path.splitext(name)[0]] = f.read()
    return out


def variant(image: Image.Image, rng: np.random.Generator) -> bytes:
    """One augmented copy: random crop, maybe a flip, small rotation, colour change, JPEG."""
    w, h = image.size
    scale = rng.uniform(0.6, 0.9)
    cw, ch = int(w * scale), int(h * scale)
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = image.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    out = out.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.5, 1.5)))
    out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.75, 1.25)))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.integers(35, 91)))
    return buf.getvalue()


def write_shards(
    folder: str, photos: dict[str, bytes], *, variants: int, shards: int = 2, seed: int = 0
) -> list[str]:
    """WebDataset tars of the variants only (key <photo>/vNN, a .json sidecar naming the photo)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    samples = []
    for photo, data in photos.items():
        rgb = imaging.decode(data).image
        for i in range(variants):
            samples.append((f"{photo}/v{i:02d}", variant(rgb, rng), photo))
    paths = []
    for s in range(shards):
        path = os.path.join(folder, f"demo-{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for key, jpeg, photo in samples[s::shards]:
                for ext, payload in (("jpg", jpeg), ("json", json.dumps({"photo": photo}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


@dataclasses.dataclass(frozen=True)
class SheetHit:
    """One hit on the contact sheet: its image, whether it is a variant of the query photo."""

    image: bytes
    relevant: bool
    rank: int
    score: float
    id: str


# Border colours of the contact sheet, in the order of its legend.
BORDERS = (
    ("black", "query photo (not in the index)"),
    ("green", "hit: a variant of the query photo"),
    ("red", "miss: another photo"),
)
_LEGEND_NOTE = "under each hit: #rank, score, id (best first)"


def contact_sheet(rows: list[tuple[str, bytes, list[SheetHit]]], path: str, thumb: int = 128) -> None:
    """One row per query (name, image bytes, hits): the query's thumbnail with a black border,
    then its hits with a green (a variant of the query photo) or red (another photo) border,
    each labelled with its rank, score and id; a legend of the colours on top."""
    font = ImageFont.load_default()  # Pillow's own font: no font file needed
    line = _text_height(font) + 3
    pad, border = 8, 3
    cell_w, cell_h = thumb + pad, thumb + 2 * line + pad
    cols = 1 + max(len(hits) for _, _, hits in rows)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    swatch = line - 3
    legend_w = sum(swatch + 4 + measure.textlength(text, font=font) + 3 * pad for _, text in BORDERS)
    header_h = 2 * line + pad
    width = max(cols * cell_w + pad, int(legend_w) + 2 * pad)
    sheet = Image.new("RGB", (width, header_h + len(rows) * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)

    x = pad
    for colour, text in BORDERS:
        draw.rectangle((x, pad, x + swatch, pad + swatch), fill=colour)
        draw.text((x + swatch + 4, pad), text, fill="black", font=font)
        x += swatch + 4 + int(measure.textlength(text, font=font)) + 3 * pad
    draw.text((pad, pad + line), _LEGEND_NOTE, fill="black", font=font)

    for r, (name, query, hits) in enumerate(rows):
        y = header_h + r * cell_h
        cells = [(query, "black", ("query", name))]
        cells += [
            (hit.image, "green" if hit.relevant else "red", (f"#{hit.rank}  {hit.score:.3f}", hit.id))
            for hit in hits
        ]
        for c, (data, colour, caption) in enumerate(cells):
            x = pad + c * cell_w
            tile = imaging.resize(imaging.decode(data, min_size=thumb).image, thumb - 2 * border, "pad")
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=colour)
            sheet.paste(Image.fromarray(tile), (x + border, y + border))
            for i, text in enumerate(caption):
                draw.text(
                    (x, y + thumb + 2 + i * line), _fit(measure, text, font, thumb), fill="black", font=font
                )
    sheet.save(path)


def _text_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, top, right, bottom = font.getbbox("Ag/")
    return int(bottom)


def _fit(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int
) -> str:
    """`text`, cut with "..." at the end when it is wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _shard_images(paths: list[str]) -> dict[str, bytes]:
    images = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    images[member.name[: -len(".jpg")]] = tar.extractfile(member).read()
    return images


def run(output: str, *, embedder: str = "builtin:efficientnet-lite0", variants: int = 6, k: int = 6) -> int:
    from pipelines import build
    from serving import Searcher

    started = time.perf_counter()
    photos = originals()
    shard_dir = os.path.join(output, "shards")
    shutil.rmtree(shard_dir, ignore_errors=True)
    shards = write_shards(shard_dir, photos, variants=variants)
    print(
        f"demo: {len(photos)} photos x {variants} variants -> {len(shards)} WebDataset shards in {shard_dir}"
    )

    result = build.run(
        [f"--input={shard_dir}/*.tar", f"--output={output}", f"--embedder=demo={embedder}", "--metadata=json"]
    )
    print(build.summary(result))

    searcher = Searcher.open(output)
    indexed = _shard_images(shards)
    found, rows = [], []
    print(f"\nquery (not in the index)  top {k} hits, cosine similarity (* = a variant of the query photo)")
    for photo, data in photos.items():
        hits = searcher.search_image(data, k=max(k, variants))
        relevant = [hit.id.split("/")[0] == photo for hit in hits]
        found.append(sum(relevant[:variants]) / variants)
        cells = "  ".join(
            f"{'*' if r else ' '}{hit.id} {hit.score:.2f}" for hit, r in zip(hits[:3], relevant)
        )
        print(f"{photo:25} {cells}  ...")
        rows.append(
            (
                photo,
                data,
                [
                    SheetHit(indexed[hit.id], r, hit.rank, hit.score, hit.id)
                    for hit, r in zip(hits[:k], relevant)
                ],
            )
        )

    sheet = os.path.join(output, "contact_sheet.png")
    contact_sheet(rows, sheet)
    print(
        f"\nhit rate: {np.mean(found):.3f} of each photo's {variants} variants are among its top "
        f"{variants} hits (mean over {len(photos)} query photos)"
    )
    print(f"published run: {result.run_dir}\ncontact sheet: {sheet}")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0
