import pytest
import torch

from flowprobe import Householder, Planar, Radial, Sylvester
from flowprobe.spec import build_flow, parse_spec


def test_chain_builds_every_family_in_order():
    flow = build_flow("planar:3:relu:min_slope=0.1+radial:2+sylvester:4:triangular+householder:2:k=3", 2)
    kinds = [type(layer.stack) for layer in flow.layers]
    assert kinds == [Planar] * 3 + [Radial] * 2 + [Sylvester] * 4 + [Householder] * 2
    assert flow.layers[0].act.name == "relu" and flow.layers[0].min_slope == 0.1
    assert [layer.flip for layer in flow.layers[5:9]] == [False, True, False, True]
    assert flow.layers[-1].reflections == 3


def test_sylvester_options():
    flow = build_flow("sylvester:2:orthogonal:m=2:act=softplus", 5)
    layer = flow.layers[0]
    assert (layer.hidden, layer.kind, layer.act.name) == (2, "orthogonal", "softplus")
    assert build_flow("sylvester:1:householder:k=3:m=1", 4).layers[0].v.shape == (3, 4)


def test_built_flow_is_exact_both_ways():
    torch.manual_seed(0)
    flow = build_flow("planar:4:tanh+radial:2+sylvester:2:orthogonal:m=1", 3, torch.float64)
    x, log_p = flow.rsample_and_log_prob(7)
    assert torch.allclose(flow.log_prob(x), log_p, atol=1e-10)
    assert x.dtype == torch.float64


def test_parse_returns_terms():
    assert parse_spec("planar:32:tanh") == [("planar", 32, {"activation": "tanh"})]
    assert parse_spec("householder:4:k=2") == [("householder", 4, {"reflections": 2})]


@pytest.mark.parametrize(
    ("spec", "token"),
    [
        ("plnar:3", "'plnar'"),
        ("planar", "''"),
        ("planar:x", "'x'"),
        ("planar:0", "'0'"),
        ("planar:3:tanhh", "'tanhh'"),
        ("radial:3:tanh", "'tanh'"),
        ("planar:3:min_slope=abc", "'min_slope=abc'"),
        ("householder:2:q=1", "'q'"),
        ("planar:2+", "''"),
        ("planar:2:tanh:tanh", "'activation'"),
    ],
)
def test_bad_specs_name_the_token(spec, token):
    with pytest.raises(ValueError, match=token) as info:
        build_flow(spec, 2)
    assert "\n" not in str(info.value)


def test_layer_errors_become_spec_errors():
    with pytest.raises(ValueError, match="sylvester layers on R\\^2: hidden must lie"):
        build_flow("sylvester:2:orthogonal:m=5", 2)
    with pytest.raises(ValueError, match="min_slope must lie"):
        build_flow("planar:2:min_slope=2", 2)
