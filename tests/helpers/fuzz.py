"""A seeded corpus of hostile input records across TFRecord shards, WebDataset tars and image
folders, generated at test time (nothing binary is committed), with the outcome expected for
every record.

`corpus(root, scale, seed)` writes the inputs under `root` and returns a `Corpus`: the
`--input` globs, one `Expect` per generated record (keyed by the `source` the readers give
it), the shards whose framing breaks (one failure row each for the unreadable rest), and the
files and tar members the run must skip.  `reconcile(corpus, embedded, failures)` checks a
run's tables against it record by record.  The writers are per format (`fuzz_tfrecord`,
`fuzz_webdataset`, `fuzz_folder`); what they share, the payloads included, is `fuzz_records`.

Outcomes:
  EMBED            a row in every embedding table
  EMBED_OR_DECODE  a row, or a `decode` failure (bit flips, truncations: either is fine)
  FAIL             a failure row with that stage (and error type, when given)
  LOST             no row of its own: the shard's one "rest" row (BrokenShard) covers it
  CORRUPT          a CorruptShard failure row, or covered by the shard's rest row
  TAIL             kept as `keep` says, or covered by the rest row; the lost ones are a
                   suffix of the shard (a truncated gzip stream: where it breaks depends on
                   the deflate blocks)
"""

from __future__ import annotations

import dataclasses

from tests.helpers.fuzz_folder import image_folder
from tests.helpers.fuzz_records import (
    BROKEN,
    CORRUPT,
    EMBED,
    EMBED_OR_DECODE,
    FAIL,
    LOST,
    TAIL,
    Builder,
    Expect,
)
from tests.helpers.fuzz_tfrecord import duplicates, tfrecord_shards
from tests.helpers.fuzz_webdataset import wds_shards


@dataclasses.dataclass
class Corpus:
    globs: list[str]
    records: list[Expect]
    rest_rows: dict[str, bool]  # shard -> True: exactly one rest row; False: at most one
    skipped_files: dict[str, int]
    skipped_members: dict[str, int]


def corpus(root: str, scale: int = 1, seed: int = 0) -> Corpus:
    """Writes the corpus under root (about 930 records per unit of scale, plus 150 in the
    broken shards); returns what every record must give."""
    root = str(root)
    b = Builder(seed)
    tfrecord_shards(b, root, scale)
    wds_shards(b, root, scale)
    image_folder(b, root, scale)
    duplicates(b, root)
    globs = [f"{root}/tfr/*.tfrecord*", f"{root}/wds", f"{root}/img"]
    members = {k: v for k, v in b.skipped_members.items() if v}
    return Corpus(globs, b.records, b.rest_rows, dict(b.skipped_files), members)


def reconcile(c: Corpus, embedded: dict[str, set[str]], failures: list[dict]) -> dict[str, int]:
    """Checks a run's tables against the corpus, record by record; returns counts.

    embedded: embedder -> the `source`s in its table; failures: the failures table's rows.
    Raises AssertionError naming the first record that does not match."""
    by_source: dict[str, list[dict]] = {}
    rest: dict[str, list[dict]] = {}
    for row in failures:
        if row["error_type"] == BROKEN:
            shard = row["source"].split("#", 1)[0]
            rest.setdefault(shard, []).append(row)
        else:
            by_source.setdefault(row["source"], []).append(row)
    with_rest = set()
    for shard, expected in c.rest_rows.items():
        rows = rest.pop(shard, [])
        assert len(rows) == 1 if expected else len(rows) <= 1, (shard, rows)
        assert all("bytes" in r["message"] for r in rows), rows  # says how many bytes were lost
        with_rest.update(shard for _ in rows)
    assert not rest, f"rest rows for shards that were not broken: {rest}"
    tables = list(embedded.values())
    counts = {"embedded": 0, "failed": 0, "lost": 0}
    lost_seen: dict[str, bool] = {}
    for record in c.records:
        rows = by_source.pop(record.source, [])
        in_tables = [record.source in t for t in tables]
        where = f"{record.source!r} ({record.outcome})"
        assert len(rows) <= 1, f"{where}: {len(rows)} failure rows {rows}"
        assert all(in_tables) or not any(in_tables), f"{where}: in some tables only"
        outcome = record.outcome
        if outcome == TAIL:
            if not rows and not any(in_tables):
                assert record.shard in with_rest, f"{where}: neither a row nor a rest row"
                lost_seen[record.shard] = True
                counts["lost"] += 1
                continue
            assert not lost_seen.get(record.shard), f"{where}: read after a lost record of its shard"
            outcome = record.keep
        if outcome == EMBED:
            assert all(in_tables) and not rows, f"{where}: not embedded; failure {rows}"
        elif outcome == EMBED_OR_DECODE:
            assert bool(rows) != all(in_tables), f"{where}: rows {rows}"
            assert not rows or rows[0]["stage"] == "decode", f"{where}: {rows}"
        elif outcome == FAIL:
            assert rows and not any(in_tables), f"{where}: no failure row"
            assert rows[0]["stage"] == record.stage, f"{where}: {rows}"
            assert record.error_type is None or rows[0]["error_type"] == record.error_type, f"{where}: {rows}"
        elif outcome == LOST:
            assert not rows and not any(in_tables), f"{where}: has a row of its own {rows}"
            counts["lost"] += 1
            continue
        elif outcome == CORRUPT:
            assert not any(in_tables), f"{where}: embedded from a corrupt gzip shard"
            assert not rows or rows[0]["error_type"] == "CorruptShard", f"{where}: {rows}"
            if not rows:
                assert record.shard in with_rest, f"{where}: neither a row of its own nor a rest row"
                counts["lost"] += 1
                continue
        counts["embedded" if all(in_tables) and tables else "failed"] += 1
    assert not by_source, f"failure rows matching no generated record: {list(by_source.values())[:3]}"
    return counts
