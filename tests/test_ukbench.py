"""Real photos with ground truth: UKBench-56 from ../shared/data (skipped when absent)."""

import csv
import os

import numpy as np
import pytest

from pipelines import embed
from retrieval import exact, metrics, tables
from tests.helpers.data import SHARED_DATA

UKBENCH = os.path.join(SHARED_DATA, "ukbench56")
pytestmark = [
    pytest.mark.slow,  # embeds 56 photos with the builtin model
    pytest.mark.skipif(
        not os.path.isdir(UKBENCH),
        reason=f"real-photo set not found at {UKBENCH} (../shared/data is not part of a clone)",
    ),
]


def test_builtin_model_finds_the_other_views_of_each_object(tmp_path):
    with open(os.path.join(UKBENCH, "groups.tsv")) as f:
        groups = {row["image"]: int(row["group"]) for row in csv.DictReader(f, delimiter="\t")}
    out = str(tmp_path / "out")
    report = embed.run([f"--input={UKBENCH}/images/*.jpg", f"--output={out}"])
    assert report["embedders"]["lite"]["embedded"] == 56 and report["counts"]["failed_total"] == 0

    data = tables.read_embeddings(f"{out}/embeddings/lite")
    labels = np.array([groups[f"images/{i}"] for i in data.ids])
    top, _ = exact.exact_search(data.vectors, data.vectors, 4, "dot_product")
    score = metrics.ns_score(labels[top], labels)
    # N-S score: same-object images among the top 4, query included (max 4); we measured ~3.96.
    assert score >= 3.8, score
