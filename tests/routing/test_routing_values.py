"""Bad values in the routing ops (issue 11): out-of-range token ids and table entries are masked (id -1,
weight 0, never the last row of the table by negative indexing) and refused in checked mode; NaN in a
row's logits, or in the bias, gives NaN routed weights rather than a confident choice."""
from __future__ import annotations

import pytest
import torch

import dsv4_kernels as dk

E, V, K = 256, 50, 6


def _hash(**changes):
    gen = torch.Generator().manual_seed(7)
    args = dict(router_logits=torch.randn(4, E, generator=gen), input_ids=torch.tensor([3, 0, 49, 7]),
                tid2eid=torch.randint(0, E, (V, K), generator=gen, dtype=torch.int32),
                num_fused_shared_experts=1, routed_scaling_factor=2.5)
    for key, value in changes.items():
        args[key] = value(args) if callable(value) else value
    return args


def _set(name, index, value):
    def change(args):
        t = args[name].clone()
        t[index] = value
        return t
    return change


CHECKED = [
    ("token-minus-one", _hash(input_ids=_set("input_ids", 2, -1)),
     "input_ids: expected values in [0, 50) (rows of tid2eid), got -1 at position (2,)"),
    ("token-past-vocab", _hash(input_ids=_set("input_ids", 1, V)),
     "input_ids: expected values in [0, 50) (rows of tid2eid), got 50 at position (1,)"),
    ("table-entry-negative", _hash(tid2eid=_set("tid2eid", (7, 4), -3)),
     "tid2eid: expected values in [0, 256) (experts), got -3 at position (7, 4)"),
    ("table-entry-past-experts", _hash(tid2eid=_set("tid2eid", (0, 0), E)),
     "tid2eid: expected values in [0, 256) (experts), got 256 at position (0, 0)"),
]


@pytest.mark.parametrize("label, args, message", CHECKED, ids=[c[0] for c in CHECKED])
def test_checked_mode_names_the_first_bad_value(monkeypatch, label, args, message):
    monkeypatch.setenv("DSV4K_CHECK", "1")
    with dk.dispatch.recording() as calls, pytest.raises(ValueError) as err:
        dk.hash_topk(**args)
    assert message in str(err.value)
    assert not calls


def test_checked_mode_passes_a_valid_call(monkeypatch):
    monkeypatch.setenv("DSV4K_CHECK", "1")
    dk.hash_topk(**_hash())


@pytest.mark.parametrize("bad_id", [-1, -V, V, 10 ** 6])
def test_an_invalid_token_id_routes_nowhere(bad_id):
    args = _hash(input_ids=_set("input_ids", 2, bad_id))
    weights, ids = dk.hash_topk(**args)
    assert ids[2, :K].tolist() == [-1] * K and weights[2, :K].tolist() == [0.0] * K
    assert ids[2, K].item() == E and weights[2, K].item() == pytest.approx(1 / 2.5)   # the shared column
    good_w, good_ids = dk.hash_topk(**_hash())
    rows = [0, 1, 3]
    assert torch.equal(ids[rows], good_ids[rows]) and torch.equal(weights[rows], good_w[rows])


def test_an_invalid_table_entry_is_dropped_and_the_row_renormalised():
    table = _hash()["tid2eid"].clone()
    table[3, 1] = -1      # token 3 (row 0): one entry invalid
    table[0, :] = E + 5   # token 0 (row 1): every entry invalid
    weights, ids = dk.hash_topk(**_hash(tid2eid=table))
    assert ids[0, 1].item() == -1 and weights[0, 1].item() == 0.0
    assert weights[0, :K].sum().item() == pytest.approx(1.0, rel=1e-6)
    assert ids[1, :K].tolist() == [-1] * K and weights[1, :K].tolist() == [0.0] * K


def test_a_nan_logit_gives_nan_weights_for_its_row_only():
    args = _hash()
    args["router_logits"][1, 17] = float("nan")  # score_topk reads every logit of the row
    weights, ids = dk.score_topk(args["router_logits"], torch.zeros(E), 6, 2.5, 1)
    assert weights[1, :K].isnan().all()
    assert not weights[[0, 2, 3]].isnan().any()
    assert ((ids[:, :K] >= 0) & (ids[:, :K] < E)).all()


def test_hash_topk_nan_at_a_named_expert_gives_nan_weights_elsewhere_nothing():
    args = _hash()
    want_w, want_ids = dk.hash_topk(**args)
    named = args["tid2eid"][args["input_ids"][1]]
    unnamed = next(e for e in range(E) if e not in named.tolist())
    args["router_logits"][1, unnamed] = float("nan")   # never read: the output is unchanged
    weights, ids = dk.hash_topk(**args)
    assert torch.equal(weights, want_w) and torch.equal(ids, want_ids)
    args["router_logits"][1, named[2]] = float("nan")
    weights, ids = dk.hash_topk(**args)
    assert weights[1, :K].isnan().all() and not weights[[0, 2, 3]].isnan().any()
    assert torch.equal(ids, want_ids)


def test_a_nan_bias_gives_nan_weights_everywhere_not_a_confident_choice():
    bias = torch.zeros(E)
    bias[5] = float("nan")
    weights, ids = dk.score_topk(torch.randn(3, E), bias, 6, 1.5, 0)
    assert weights.isnan().all()
    assert ((ids >= 0) & (ids < E)).all()
