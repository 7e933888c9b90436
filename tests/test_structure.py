"""The public structure is derived at build time, stored in the version, and carried across updates."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_client.errors import ConfigError
from lite_server.api.updates import remove_spots
from lite_server.config import ServerConfig
from lite_server.index.store import Index
from lite_server.index.structure import FILE, Structure, StructureParams, derive
from lite_server.search.lookup import Lookup
from tests.conftest import copy_index


def test_a_build_stores_the_structure_and_a_server_start_only_loads_it(index_dir: Path) -> None:
    index = Index.load(index_dir)
    stored = Structure.load(index.path)
    assert stored is not None and stored.matches([s.id for s in index.spots], StructureParams())
    lookup = Lookup(index)
    assert np.array_equal(lookup.spot_cell, stored.spot_cell)
    assert np.array_equal(lookup.prototypes, stored.prototypes)
    assert lookup.codec is not None and np.array_equal(lookup.codec.basis_, stored.basis)
    assert np.bincount(stored.spot_cell).min() >= StructureParams().cell_min_spots or lookup.n_cells == 1


def test_an_index_without_a_stored_structure_derives_the_same_one_at_load(index_dir: Path, tmp_path: Path) -> None:
    copy = copy_index(index_dir, tmp_path)
    index = Index.load(copy)
    stored = Structure.load(index.path)
    (index.path / FILE).unlink()
    lookup = Lookup(index)  # an index built before structures were stored
    assert np.array_equal(lookup.spot_cell, stored.spot_cell)
    assert np.allclose(lookup.prototypes, stored.prototypes)
    assert lookup.calibration["scores"] == Lookup(Index.load(index_dir)).calibration["scores"]


def test_an_update_keeps_the_basis_and_what_unchanged_spots_publish(index_dir: Path, tmp_path: Path) -> None:
    copy = copy_index(index_dir, tmp_path)
    before = Structure.load(Index.load(copy).path)
    gone = str(before.spot_ids[0])
    after_index = remove_spots(copy, [gone])
    after = Structure.load(after_index.path)
    assert after is not None and gone not in after.spot_ids.tolist()
    assert np.array_equal(after.basis, before.basis)
    old_row = {s: i for i, s in enumerate(before.spot_ids.tolist())}
    for row, spot in enumerate(after.spot_ids.tolist()):
        assert np.array_equal(after.looks[after.look_spot == row], before.looks[before.look_spot == old_row[spot]])
    moved = after.spot_cell != before.spot_cell[[old_row[s] for s in after.spot_ids.tolist()]]
    assert moved.sum() <= StructureParams().cell_min_spots  # at most one cell's worth


def test_other_settings_derive_a_new_structure(index_dir: Path) -> None:
    index = Index.load(index_dir)
    params = StructureParams(codec_dim=64, cell_min_spots=5)
    previous = Structure.load(index.path)
    fresh = derive(index.features, index.photo_spot, [s.id for s in index.spots], params, previous)
    assert fresh.basis.shape[0] == 64 and fresh.looks.shape[1] == 64
    assert np.bincount(fresh.spot_cell).min() >= 5


def test_the_structure_seed_moves_only_the_k_means_starts(index_dir: Path) -> None:
    """Researchers vary the seed to see how much a figure owes to the starts; a negative one is refused."""
    index = Index.load(index_dir)
    ids = [s.id for s in index.spots]
    seeded = derive(index.features, index.photo_spot, ids, StructureParams(structure_seed=1))
    again = derive(index.features, index.photo_spot, ids, StructureParams(structure_seed=1))
    stored = Structure.load(index.path)
    assert np.array_equal(seeded.looks, again.looks) and np.array_equal(seeded.spot_cell, again.spot_cell)
    assert not np.array_equal(seeded.looks, stored.looks)
    assert np.array_equal(seeded.basis, stored.basis) and np.array_equal(seeded.look_spot, stored.look_spot)
    assert not stored.matches(ids, seeded.params)  # a server with another seed derives its own
    with pytest.raises(ConfigError, match="structure_seed"):
        StructureParams.from_config(ServerConfig(structure_seed=-1))


def test_4_bit_looks_are_the_same_looks_calibrated_as_the_phone_decodes_them(index_dir: Path) -> None:
    """look_bits changes no look (the codes are chosen when answering) but the calibration, which scores
    looks as the phone decodes them; a stored structure of the other bits is not taken for it, and only 8
    and 4 bits exist, 4 on a codec whose dimension the Hadamard rotation fits (or on no codec at all,
    whose looks travel as float16 anyway)."""
    index = Index.load(index_dir)
    ids = [s.id for s in index.spots]
    stored = Structure.load(index.path)
    assert stored.params.look_bits == 4  # the default
    wide = derive(index.features, index.photo_spot, ids, StructureParams(look_bits=8))
    assert np.array_equal(wide.looks, stored.looks) and np.array_equal(wide.basis, stored.basis)
    assert wide.scores.shape[1] == stored.scores.shape[1] and not np.array_equal(wide.scores, stored.scores)
    assert not stored.matches(ids, wide.params)
    assert StructureParams.from_config(ServerConfig(look_bits=8)) == wide.params
    for config, message in ((ServerConfig(look_bits=6), "look_bits"), (ServerConfig(look_bits=4, codec_dim=96), "96")):
        with pytest.raises(ConfigError, match=message):
            StructureParams.from_config(config)
    assert StructureParams.from_config(ServerConfig(codec_dim=0)).look_bits == 4


class _CountingRows:
    """A gallery that counts the photo rows read from it."""

    def __init__(self, features: np.ndarray):
        self.features, self.shape, self.dtype, self.read = features, features.shape, features.dtype, 0

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        self.read += len(rows)
        return self.features[rows]


def test_an_update_reads_only_the_spots_it_must_and_derives_what_reading_every_photo_would() -> None:
    from dataclasses import replace

    from tools.bench.synthetic import generate

    catalogue = generate(1000, seed=0)
    ids = [s.id for s in catalogue.spots]
    first = derive(catalogue.features, catalogue.photo_spot, ids)
    assert first.means is not None and first.means.dtype == np.float16 and len(first.means) == len(ids)
    # What `index add` makes: ten spots gain their held-out query photo, and one spot is new.
    grown = np.arange(0, 1000, 100)
    features = np.concatenate([catalogue.features, catalogue.queries[np.searchsorted(catalogue.query_spot, grown)],
                               catalogue.features[catalogue.photo_spot == 7][:3]])
    photo_spot = np.concatenate([catalogue.photo_spot, grown, [1000] * 3])
    counting = _CountingRows(features)
    fast = derive(counting, photo_spot, ids + ["new"], previous=first)
    full = derive(features, photo_spot, ids + ["new"], previous=replace(first, means=None))
    assert counting.read < 0.8 * len(photo_spot), counting.read / len(photo_spot)  # new, grown, calibration sample
    assert np.array_equal(fast.spot_cell, full.spot_cell)
    assert np.allclose(fast.looks, full.looks, atol=1e-5) and np.allclose(fast.prototypes, full.prototypes, atol=1e-5)
    assert np.allclose(fast.scores, full.scores, atol=1e-5)
    assert np.allclose(fast.means.astype(np.float32), full.means.astype(np.float32), atol=2e-3)


def test_a_structure_stored_before_codecs_had_a_kind_loads_as_pca(index_dir: Path, tmp_path: Path) -> None:
    """Versions written before ``codec_kind`` and ``look_bits`` existed hold a PCA basis and int8 looks:
    they load as such, so a server of those settings keeps using them and one of today's defaults
    derives its own."""
    import json

    copy = copy_index(index_dir, tmp_path)
    index = Index.load(copy)
    before = StructureParams(codec_kind="pca", look_bits=8)
    derive(index.features, index.photo_spot, [s.id for s in index.spots], before).save(index.path)
    with np.load(index.path / FILE, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(str(arrays.pop("header")))
    del header["params"]["codec_kind"], header["params"]["look_bits"]
    np.savez(index.path / FILE, header=np.array(json.dumps(header)), **arrays)
    old = Structure.load(index.path)
    assert old is not None and old.params == before
    ids = old.spot_ids.tolist()
    assert old.matches(ids, before) and not old.matches(ids, StructureParams())
    with pytest.raises(ConfigError, match="codec_kind"):
        StructureParams.from_config(ServerConfig(codec_kind="lda"))
