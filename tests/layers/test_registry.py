"""The registry is the one place that says which families exist: specs, docs and tests read it."""

from pathlib import Path

import pytest

import flowprobe as fp
from flowprobe.layers import families, family_table, register
from flowprobe.spec import parse_spec

BUILT_IN = ["planar", "radial", "sylvester", "general_sylvester", "householder"]


def test_built_in_families_are_registered_with_examples():
    known = families()
    assert set(BUILT_IN) <= set(known)
    for name in BUILT_IN:
        assert known[name].cls.family == name and known[name].examples(3)


def test_readme_table_lists_every_built_in_family_as_the_registry_does():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in family_table().splitlines()[2:]}
    for name in BUILT_IN:
        assert rows[f"`{name}`"] in readme, name


def test_spec_words_and_keys_come_from_the_family():
    assert parse_spec("sylvester:2:triangular:act=elu+planar:3:umax=0.5") == [
        ("sylvester", 2, {"kind": "triangular", "activation": "elu"}),
        ("planar", 3, {"u_max": 0.5}),
    ]
    with pytest.raises(ValueError, match="unknown option 'orthogonal' for planar layers"):
        parse_spec("planar:2:orthogonal")
    with pytest.raises(ValueError, match="unknown layer family 'planr'.*expected one of: .*planar"):
        parse_spec("planr:2")


def test_a_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="'planar' is already registered by Planar"):
        register("planar")(type("Other", (fp.layers.FlowLayer,), {}))
