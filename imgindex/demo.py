"""The embedded default job (`imgindex demo`, `make run`).

Real photographs that scikit-image ships are augmented into variants (crop, flip, small
rotation, colour change, JPEG re-encode), so every original has known relevant images.  All
are embedded with the builtin model, indexed with ScaNN and queried with each original; the
hit rate (variants found in the top k) is measured, printed and drawn as a contact sheet.
"""
from __future__ import annotations

import importlib.util
import io
import os
import time

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from retrieval import embedders, imaging, index, tables
from retrieval.errors import ConfigError

# Colour and greyscale photographs bundled inside the scikit-image wheel (no download).
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
          "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
          "motorcycle_left.png", "retina.jpg", "rocket.jpg")


def photo_dir() -> str:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the demo photos come from scikit-image: pip install 'imgindex[demo]'")
    return os.path.join(spec.submodule_search_locations[0], "data")


def variant(image: Image.Image, rng: np.random.Generator) -> bytes:
    """One augmented copy: random crop, maybe a flip, small rotation, colour change, JPEG."""
    w, h = image.size
    scale = rng.uniform(0.7, 0.95)
    cw, ch = int(w * scale), int(h * scale)
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = image.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    out = out.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR)
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.6, 1.4)))
    out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.8, 1.2)))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.integers(40, 91)))
    return buf.getvalue()


def make_images(variants: int, seed: int = 0) -> list[tuple[str, str, bytes]]:
    """Returns (id, group, encoded bytes) for every original and its variants."""
    rng = np.random.default_rng(seed)
    folder = photo_dir()
    items = []
    for name in PHOTOS:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            original = f.read()
        group = os.path.splitext(name)[0]
        items.append((f"{group}/original", group, original))
        rgb = imaging.decode(original).image
        for i in range(variants):
            items.append((f"{group}/v{i}", group, variant(rgb, rng)))
    return items


def contact_sheet(rows: list[tuple[bytes, list[tuple[bytes, bool]]]], path: str, thumb: int = 96) -> None:
    """Query thumbnail then its hits; green border = same photo, red = other."""
    cols = 1 + max(len(hits) for _, hits in rows)
    pad = 6
    sheet = Image.new("RGB", (cols * (thumb + pad) + pad, len(rows) * (thumb + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (query, hits) in enumerate(rows):
        y = pad + r * (thumb + pad)
        cells = [(query, None)] + hits
        for c, (data, relevant) in enumerate(cells):
            x = pad + c * (thumb + pad) + (pad if c else 0)
            tile = imaging.resize(imaging.decode(data, min_size=thumb).image, thumb - 4, "pad")
            colour = "black" if relevant is None else ("green" if relevant else "red")
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=colour)
            sheet.paste(Image.fromarray(tile), (x + 2, y + 2))
    sheet.save(path)


def run(output: str, embedder: str = "builtin:efficientnet-lite0", variants: int = 5, k: int = 6,
        batch_size: int = 32) -> int:
    started = time.perf_counter()
    spec = embedders.parse_embedder_arg(f"demo={embedder}")
    items = make_images(variants)
    print(f"demo: {len(PHOTOS)} photos x (1 original + {variants} variants) = {len(items)} images")

    model, spec = embedders.complete_spec(spec)
    decoded = [imaging.decode(data, min_size=spec.input_size) for _, _, data in items]
    pixels = np.stack([imaging.resize(d.image, spec.input_size, spec.resize) for d in decoded])
    vectors = np.concatenate([embedders.embed_batch(model, spec, pixels[i:i + batch_size])
                              for i in range(0, len(pixels), batch_size)])

    os.makedirs(os.path.join(output, "embeddings"), exist_ok=True)
    table_path = os.path.join(output, "embeddings", "part-00000.parquet")
    tables.write_embeddings(
        table_path, spec, ids=[i for i, _, _ in items], vectors=vectors,
        sha256s=[imaging.sha256_hex(d) for _, _, d in items],
        sources=[f"skimage-data:{i}" for i, _, _ in items],
        widths=[d.width for d in decoded], heights=[d.height for d in decoded])
    data = tables.read_embeddings(table_path)
    built = index.build_index(data.vectors, data.ids, distance="cosine", embedder=spec.to_dict())
    index_dir = os.path.join(output, "index")
    built.save(index_dir, overwrite=True)
    loaded = index.load_index(index_dir)

    groups = {i: g for i, g, _ in items}
    encoded = {i: d for i, _, d in items}
    queries = [(i, v) for (i, _, _), v in zip(items, vectors) if i.endswith("/original")]
    # One extra hit because each query finds itself first; at least `variants` to score.
    ids, scores = loaded.search_batch(np.stack([v for _, v in queries]), k=max(k, variants) + 1)
    found, rows = [], []
    print(f"\n{'query':28} top {k} hits (cosine similarity; * = a variant of the query photo)")
    for (qid, _), hit_ids, hit_scores in zip(queries, ids, scores):
        hits = [(h, s) for h, s in zip(hit_ids, hit_scores) if h != qid]
        relevant = [groups[h] == groups[qid] for h, _ in hits]
        found.append(sum(relevant[:variants]) / variants)
        hits, relevant = hits[:k], relevant[:k]
        cells = "  ".join(f"{'*' if r else ' '}{h} {s:.2f}" for (h, s), r in zip(hits[:3], relevant))
        print(f"{qid:28} {cells}  ...")
        rows.append((encoded[qid], [(encoded[h], r) for (h, _), r in zip(hits, relevant)]))

    sheet = os.path.join(output, "contact_sheet.png")
    contact_sheet(rows, sheet)
    print(f"\nhit rate: {np.mean(found):.3f} of each photo's {variants} variants are in its top "
          f"{variants} hits (mean over {len(queries)} queries)")
    print(f"index recall@{loaded.manifest.recall['k']} vs exact: {loaded.manifest.recall['value']:.3f}")
    print(f"embeddings: {table_path}\nindex:      {index_dir}\ncontact sheet: {sheet}")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0
