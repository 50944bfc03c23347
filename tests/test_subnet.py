"""Subnet: text grammar, JSON, validation messages and sampling from an ElasticSpace."""

import random

import pytest

from elasticmoe.config import ConfigError, ElasticSpace, ModelConfig
from elasticmoe.subnet import (
    LayerSpec,
    Subnet,
    enumerate_uniform,
    largest,
    sample_per_layer,
    sample_uniform,
    smallest,
)


@pytest.fixture
def config() -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        d_model=32,
        layers=6,
        heads=4,
        kv_heads=2,
        head_dim=8,
        experts=8,
        top_k=2,
        expert_width=64,
        max_seq_len=32,
    )


@pytest.fixture
def space() -> ElasticSpace:
    return ElasticSpace(depths=(3, 4, 6), experts=(1, 2, 4, 8), top_ks=(1, 2), widths=(16, 32, 64))


# -- text grammar -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, layers",
    [
        ("L[0-5] E8 k2 W64", (0, 1, 2, 3, 4, 5)),
        ("L[0,2] E4 k1 W16", (0, 2)),
        ("L[0-1,3,5] E2 k2 W32", (0, 1, 3, 5)),
        ("L[4] E1 k1 W1", (4,)),
    ],
)
def test_print_parse_round_trip(config, text, layers):
    sub = Subnet.parse(text, config)
    assert sub.layers == layers and sub.is_uniform
    assert str(sub) == text
    assert Subnet.parse(str(sub), config) == sub


def test_fields_in_any_order_and_spacing(config):
    sub = Subnet.parse("  W32 k1  L[0,2-3]   E4 ", config)
    assert sub == Subnet.uniform((0, 2, 3), 4, 1, 32)
    assert str(sub) == "L[0,2-3] E4 k1 W32"
    assert hash(sub) == hash(Subnet.uniform([0, 2, 3], 4, 1, 32))  # usable as a dict key / set member


def test_depth_shorthand_follows_layer_order(config):
    assert Subnet.parse("L3 E8 k2 W64", config).layers == (0, 1, 2)  # identity order by default
    order = [5, 0, 3, 1, 4, 2]
    sub = Subnet.parse("L3 E8 k2 W64", config, layer_order=order)
    assert sub.layers == (0, 3, 5)  # the first three of `order`, in network order
    assert str(sub) == "L[0,3,5] E8 k2 W64"
    assert Subnet.parse(str(sub), config) == sub  # the printed explicit form needs no layer order


def test_per_layer_json_round_trip(config):
    sub = Subnet((0, 3, 4), (LayerSpec(8, 2, 64), LayerSpec(4, 1, 16), LayerSpec(2, 2, 32)))
    assert not sub.is_uniform
    text = str(sub)
    assert text.startswith("{") and text == sub.to_json()
    back = Subnet.parse(text, config)
    assert back == sub and back.spec_for(3) == LayerSpec(4, 1, 16)
    assert Subnet.from_dict(sub.to_dict()) == sub


@pytest.mark.parametrize(
    "text, expected",
    [
        ("L3 E8 k2", r"missing field\(s\) \['W'\]"),
        ("L3 E8 k2 W64 E4", r"field E given twice"),
        ("L3 E8 k2 X64 W64", r"cannot read 'X64'"),
        ("L3 Efour k2 W64", r"Efour must be E followed by an integer"),
        ("L3 E² k2 W64", r"E² must be E followed by an integer"),
        ("L3 E8 k-1 W64", r"k-1 must be k followed by an integer"),
        ("L0 E8 k2 W64", r"depth L0 out of range; allowed \[1, 6\]"),
        ("L7 E8 k2 W64", r"depth L7 out of range; allowed \[1, 6\]"),
        ("L(0-2) E8 k2 W64", r"layers must be 'L<depth>' or 'L\[<indices>\]'"),
        ("L[3-1] E8 k2 W64", r"bad layer range '3-1'"),
        ("L[0,a] E8 k2 W64", r"layers must be 'L<depth>' or 'L\[<indices>\]'"),
        ("L[0,,2-] E8 k2 W64", r"bad layer range '2-'"),
        ("L[] E8 k2 W64", r"depth 0 is not allowed; keep between 1 and 6 layers"),
        ("L[2,1] E8 k2 W64", r"must be strictly increasing"),
        ("L[1,1] E8 k2 W64", r"must be strictly increasing"),
        ("L[0,6] E8 k2 W64", r"layer index 6 is out of range; allowed \[0, 5\]"),
        ("L[0-2] E9 k2 W64", r"experts=9 out of range; allowed \[1, 8\]"),
        ("L[0-2] E2 k3 W64", r"top_k=3 out of range; allowed \[1, 2\] \(top-k cannot exceed the experts kept\)"),
        ("L[0-2] E8 k0 W64", r"top_k=0 out of range"),
        ("L[0-2] E8 k2 W65", r"width=65 out of range; allowed \[1, 64\]"),
        ("L[0-2] E8 k2 W0", r"width=0 out of range; allowed \[1, 64\]"),
        ("{not json", r"subnet JSON does not parse"),
    ],
)
def test_malformed_specs_raise_config_error(config, text, expected):
    with pytest.raises(ConfigError, match=expected):
        Subnet.parse(text, config)


def test_validation_reports_every_problem(config):
    with pytest.raises(ConfigError) as err:
        Subnet.parse("L[0,9] E9 k4 W99", config)
    msg = str(err.value)
    for part in ("layer index 9", "experts=9", "width=99"):
        assert part in msg


def _entry(**changes):
    return {"index": 0, "experts": 8, "top_k": 2, "width": 64, **changes}


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"layers": [_entry()], "extra": 1}, r"got fields \['extra', 'layers'\]"),
        ({"layers": [_entry(bias=1)]}, r"layers\[0\] has fields .*'bias'"),
        ({"layers": [{"index": 0, "experts": 8, "top_k": 2}]}, r"layers\[0\] has fields .*expected exactly"),
        ({"layers": [_entry(experts="8")]}, r"layers\[0\].experts='8' must be an integer"),
        ({"layers": [_entry(top_k=True)]}, r"layers\[0\].top_k=True must be an integer"),
        ({"layers": [_entry(index=7)]}, r"layer index 7 is out of range; allowed \[0, 5\]"),
        ({"layers": [_entry(experts=2, top_k=4)]}, r"top_k=4 out of range; allowed \[1, 2\]"),
        ({"layers": []}, r"depth 0 is not allowed"),
    ],
)
def test_bad_subnet_json_raises_config_error(config, data, expected):
    import json

    with pytest.raises(ConfigError, match=expected):
        Subnet.parse(json.dumps(data), config)


def test_subnet_json_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"subnet JSON must be .*got list"):
        Subnet.from_dict([1, 2])


def test_per_layer_validation_uses_child_layer_shapes(config):
    from dataclasses import replace

    child = replace(config, layers=2, layer_shapes=((8, 2, 64), (2, 1, 16)))
    assert Subnet.full(child) == Subnet((0, 1), (LayerSpec(8, 2, 64), LayerSpec(2, 1, 16)))
    with pytest.raises(ConfigError, match=r"layer 1: width=32 out of range; allowed \[1, 16\]"):
        Subnet.uniform((0, 1), 2, 1, 32).validate(child)


# -- sampling ---------------------------------------------------------------------------------
def test_largest_and_smallest(config, space):
    order = [5, 4, 3, 2, 1, 0]
    assert largest(space, order) == Subnet.uniform(range(6), 8, 2, 64)
    small = smallest(space, order)
    assert small == Subnet.uniform((3, 4, 5), 1, 1, 16)
    small.validate(config)


def test_largest_never_routes_above_its_experts(config):
    odd = ElasticSpace(depths=(6,), experts=(1,), top_ks=(1, 2), widths=(64,))
    odd.validate(config)  # allowed: min top-k <= min experts
    assert largest(odd, list(range(6))).specs[0] == LayerSpec(1, 1, 64)


def test_sampling_respects_top_k_le_experts_and_space(config, space):
    rng = random.Random(0)
    order = list(range(6))
    seen_e, seen_k = set(), set()
    for _ in range(300):
        for sub in (sample_uniform(space, order, rng), sample_per_layer(space, order, rng)):
            sub.validate(config)
            assert sub.in_space(space)
            assert all(s.top_k <= s.experts for s in sub.specs)
            seen_e |= {s.experts for s in sub.specs}
            seen_k |= {s.top_k for s in sub.specs}
    assert seen_e == set(space.experts) and seen_k == set(space.top_ks)


def test_sampling_is_reproducible_and_per_layer_varies(space):
    order = list(range(6))
    a = [sample_per_layer(space, order, random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(1)
    assert any(not sample_per_layer(space, order, rng).is_uniform for _ in range(50))


def test_depth_sampling_follows_layer_order(space):
    order = [5, 3, 1, 0, 2, 4]
    rng = random.Random(3)
    for _ in range(50):
        sub = sample_uniform(space, order, rng)
        assert sub.layers == tuple(sorted(order[: sub.depth]))


def test_enumerate_uniform_count(config, space):
    subs = enumerate_uniform(space, list(range(6)))
    # depths x widths x (experts, top_k) pairs with k <= e: e=1 -> 1 choice, e=2,4,8 -> 2 choices
    assert len(subs) == 3 * 3 * (1 + 2 + 2 + 2) == 63
    assert len(set(subs)) == len(subs)
    for sub in subs:
        sub.validate(config)
        assert sub.in_space(space)


def test_in_space_rejects_values_the_space_does_not_offer(space):
    assert Subnet.uniform(range(3), 4, 2, 32).in_space(space)
    assert not Subnet.uniform(range(2), 4, 2, 32).in_space(space)  # depth 2 not offered
    assert not Subnet.uniform(range(3), 3, 2, 32).in_space(space)  # 3 experts not offered
    assert not Subnet.uniform(range(3), 4, 2, 48).in_space(space)  # width 48 not offered
    mixed = Subnet((0, 1, 2), (LayerSpec(4, 2, 32), LayerSpec(4, 2, 32), LayerSpec(4, 2, 20)))
    assert not mixed.in_space(space)  # one layer outside is enough
