"""The public structure is derived at build time, stored in the version, and carried across updates."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lite_server.index import Index
from lite_server.lookup import Lookup
from lite_server.structure import FILE, Structure, StructureParams, derive
from lite_server.updates import remove_spots
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
