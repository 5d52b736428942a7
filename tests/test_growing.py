"""GrowingColumns: the per-row buffers behind the eagle drafter's key/value entries."""

from __future__ import annotations

import pytest
import torch

from mtp_ext.growing import GrowingColumns


def test_appends_keep_every_column_in_order_across_growth():
    cols = GrowingColumns(min_capacity=2)
    want_k, want_m = [], []
    for step, n in enumerate([1, 3, 2, 5, 1]):
        k = torch.randn(2, n, 3, 4)
        m = torch.rand(2, n) > 0.5
        cols.append(k=k, m=m)
        want_k.append(k)
        want_m.append(m)
        assert cols.length == sum(t.shape[1] for t in want_k)
        assert torch.equal(cols["k"], torch.cat(want_k, 1))
        assert torch.equal(cols["m"], torch.cat(want_m, 1))
        assert cols["m"].dtype == torch.bool


def test_capacity_doubles_so_appends_stay_in_place():
    cols = GrowingColumns(min_capacity=4)
    cols.append(x=torch.zeros(1, 3))
    first = cols["x"].data_ptr()
    cols.append(x=torch.ones(1, 1))  # fits: same storage
    assert cols["x"].data_ptr() == first
    cols.append(x=torch.ones(1, 1))  # 5 > 4: grows to 8
    assert cols["x"].data_ptr() != first
    grown = cols["x"].data_ptr()
    cols.append(x=torch.ones(1, 3))  # 8 fits
    assert cols["x"].data_ptr() == grown
    assert cols["x"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]


def test_bad_input():
    cols = GrowingColumns()
    assert cols.empty
    with pytest.raises(KeyError, match="nothing appended"):
        cols["k"]
    with pytest.raises(ValueError, match="same count"):
        cols.append(k=torch.zeros(1, 2), v=torch.zeros(1, 3))
    cols.append(k=torch.zeros(1, 2), v=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="expected buffers"):
        cols.append(k=torch.zeros(1, 2))
