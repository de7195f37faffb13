"""PromptSpec and the NumPy reference: shapes, counts, validation, formulas, seeding."""

import math

import numpy as np
import pytest

from lrpt import PromptSpec, SpecError
from lrpt.reference import activation, init_params, materialize


def test_param_counts_match_design_table():
    d = 576
    assert PromptSpec("prompt", n_tokens=20).param_count(d) == 20 * 576  # 11,520
    assert PromptSpec("lopt1", n_tokens=20, rank=5).param_count(d) == 2_980  # r(n+d)
    assert PromptSpec("lopt2", n_tokens=20, rank=5).param_count(d) == 2 * 5 * 576  # X0 is fixed
    lopa = PromptSpec("lopa", n_tokens=20, rank=2, head_hidden=256)
    heads = (256 * 576 + 256) * 2 + (20 * 2 * 256 + 20 * 2) + (576 * 2 * 256 + 576 * 2)
    assert lopa.param_count(d) == 20 * 576 + heads


def test_param_shapes():
    s = PromptSpec("lopt2", n_tokens=4, rank=3).param_shapes(8)
    assert s == {"lopt.X0": (4, 8), "lopt.U": (8, 3), "lopt.V": (3, 8)}
    s = PromptSpec("lopa", n_tokens=4, rank=2, head_hidden=5).param_shapes(8)
    assert s["lopa.u.1.weight"] == (8, 5) and s["lopa.v.1.weight"] == (16, 5)
    assert s["lopa.u.0.weight"] == (5, 8) and s["lopa.v.0.bias"] == (5,)
    assert PromptSpec("lopt2", n_tokens=4, rank=3).trainable_names() == ("lopt.U", "lopt.V")


@pytest.mark.parametrize(
    "kwargs, dim, match",
    [
        (dict(method="nope"), 8, "unknown method"),
        (dict(method="prompt", n_tokens=0), 8, "n_tokens"),
        (dict(method="lopt1", n_tokens=4), 8, "needs a rank"),
        (dict(method="lopt1", n_tokens=4, rank=5), 8, "rank 5 is larger than n_tokens = 4"),  # at construction
        (dict(method="lopt1", n_tokens=20, rank=9), 8, r"min\(n_tokens, dim\) = 8"),
        (dict(method="lopt2", n_tokens=4, rank=9), 8, "larger than dim"),
        (dict(method="lopa", n_tokens=4, rank=0), 8, "rank must be >= 1"),
        (dict(method="lopt2", n_tokens=4, rank=2, activation="tanh"), 8, "unknown activation"),
        (dict(method="lopa", n_tokens=4, rank=2, gate="mul"), 8, "unknown gate"),
        (dict(method="lopa", n_tokens=4, rank=2, encoder="bert"), 8, "unknown encoder"),
        (dict(method="lopa", n_tokens=4, rank=2, dropout=1.0), 8, "dropout"),
        (dict(method="prompt", init="text"), 8, "init_text"),
        (dict(method="prompt", n_tokens=2.5), 8, "integer"),
    ],
)
def test_validate_rejects(kwargs, dim, match):
    with pytest.raises(SpecError, match=match):
        PromptSpec(**kwargs).validate(dim)


def test_lopt1_rank_may_equal_min():
    PromptSpec("lopt1", n_tokens=4, rank=4).validate(8)
    PromptSpec("lopt2", n_tokens=4, rank=8).validate(8)  # lopt2's bound is d, not n


def test_json_round_trip():
    spec = PromptSpec("lopa", n_tokens=7, rank=3, gate="max", encoder="embed", pooling="last", dropout=0.0)
    assert PromptSpec.from_json(spec.to_json()) == spec
    with pytest.raises(SpecError, match="unknown spec field"):
        PromptSpec.from_dict({"method": "prompt", "colour": "red"})
    with pytest.raises(SpecError, match="no 'method'"):
        PromptSpec.from_dict({"n_tokens": 3})
    with pytest.raises(SpecError, match="not valid JSON"):
        PromptSpec.from_json("{")


@pytest.mark.parametrize("method", ["prompt", "lopt1", "lopt2", "lopa"])
def test_same_seed_same_arrays(method):
    spec = PromptSpec(method, n_tokens=5, rank=None if method == "prompt" else 2, head_hidden=8)
    a = init_params(spec, 12, seed=3)
    b = init_params(spec, 12, seed=3)
    c = init_params(spec, 12, seed=4)
    assert a.keys() == b.keys() == spec.param_shapes(12).keys()
    for k in a:
        assert a[k].dtype == np.float32 and a[k].shape == spec.param_shapes(12)[k]
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_init_scale_follows_embeddings():
    rng = np.random.default_rng(0)
    emb = (rng.standard_normal((500, 64)) * 0.1).astype(np.float32)
    for method in ("prompt", "lopt1", "lopt2"):
        spec = PromptSpec(method, n_tokens=50, rank=None if method == "prompt" else 8)
        x = materialize(spec, init_params(spec, 64, 0, emb))
        assert 0.05 < x.std() < 0.2, (method, x.std())


def test_vocab_and_text_init():
    emb = np.arange(40, dtype=np.float32).reshape(10, 4)
    spec = PromptSpec("prompt", n_tokens=5, init="text", init_text="hi")
    p = init_params(spec, 4, 0, emb, init_token_ids=[2, 7])
    np.testing.assert_array_equal(p["prompt_embeddings"], emb[[2, 7, 2, 7, 2]])
    spec = PromptSpec("prompt", n_tokens=3, init="vocab")
    rows = init_params(spec, 4, 0, emb)["prompt_embeddings"]
    assert all(any(np.array_equal(r, e) for e in emb) for r in rows)
    # lopt1 from text: the best rank-r approximation of the text embeddings.
    spec = PromptSpec("lopt1", n_tokens=3, rank=3, init="text", init_text="x")
    p = init_params(spec, 4, 0, emb, init_token_ids=[1, 4, 9])
    np.testing.assert_allclose(p["lopt.U"] @ p["lopt.V"], emb[[1, 4, 9]], atol=1e-4)
    with pytest.raises(SpecError, match="embedding rows"):
        init_params(PromptSpec("prompt", init="vocab"), 4, 0)


def test_lopt1_text_init_of_lower_rank_keeps_every_component_trainable():
    """Two label words repeated to n rows are a rank-2 start: at rank 4 the other two components
    must not be a dead saddle (U column and V row both zero)."""
    emb = np.random.default_rng(1).standard_normal((10, 6)).astype(np.float32)
    spec = PromptSpec("lopt1", n_tokens=6, rank=4, init="text", init_text="x y")
    p = init_params(spec, 6, 0, emb, init_token_ids=[3, 8])
    np.testing.assert_allclose(p["lopt.U"] @ p["lopt.V"], emb[[3, 8, 3, 8, 3, 8]], atol=1e-5)
    # dL/dV = Uᵀ G and dL/dU = G Vᵀ: every component gets a gradient from V's side.
    assert np.all(np.abs(p["lopt.U"]).sum(0) > 0.1), p["lopt.U"]
    assert np.count_nonzero(np.abs(p["lopt.V"]).sum(1) == 0) == 2


def test_materialize_formulas_by_hand():
    u = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    v = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], np.float32)
    x = materialize(PromptSpec("lopt1", n_tokens=2, rank=2), {"lopt.U": u, "lopt.V": v})
    np.testing.assert_allclose(x, [[1, 2, 3], [-2, 1, 0]])

    x0 = np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]], np.float32)
    u2 = np.array([[1.0], [2.0], [0.5]], np.float32)  # x0 @ u2 = [[-1], [1]]
    v2 = np.array([[1.0, 2.0, 3.0]], np.float32)
    params = {"lopt.X0": x0, "lopt.U": u2, "lopt.V": v2}
    elu = materialize(PromptSpec("lopt2", n_tokens=2, rank=1), params)
    np.testing.assert_allclose(elu, [[math.expm1(-1) * c for c in (1, 2, 3)], [1, 2, 3]], rtol=1e-6)
    relu = materialize(PromptSpec("lopt2", n_tokens=2, rank=1, activation="relu"), params)
    np.testing.assert_allclose(relu, [[0, 0, 0], [1, 2, 3]])
    gelu = materialize(PromptSpec("lopt2", n_tokens=2, rank=1, activation="gelu"), params)
    g = lambda t: 0.5 * t * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    np.testing.assert_allclose(gelu, [[g(-1) * c for c in (1, 2, 3)], [g(1) * c for c in (1, 2, 3)]], rtol=1e-6)
    np.testing.assert_allclose(activation("elu", np.array([2.0])), [2.0])


def _lopa_params(n=2, d=3, r=1, h2=2):
    """Heads chosen so that u = [[x0], [x1]]... computed by hand below."""
    eye = np.eye(h2, d, dtype=np.float32)
    return {
        "lopa.Z_S": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32),
        "lopa.u.0.weight": eye,
        "lopa.u.0.bias": np.zeros(h2, np.float32),
        "lopa.u.1.weight": np.array([[1.0, 0.0], [0.0, 1.0]], np.float32),  # u = tanh(x[:2])
        "lopa.u.1.bias": np.zeros(n * r, np.float32),
        "lopa.v.0.weight": eye,
        "lopa.v.0.bias": np.zeros(h2, np.float32),
        "lopa.v.1.weight": np.zeros((d * r, h2), np.float32),
        "lopa.v.1.bias": np.array([1.0, -1.0, 0.5], np.float32),  # v = [1, -1, .5]
    }


def test_lopa_by_hand_all_gates():
    params = _lopa_params()
    enc = np.array([[0.5, -0.25, 9.0], [0.0, 1.0, 0.0]], np.float32)
    u = np.tanh(enc[:, :2])  # (B, n·r) = (B, 2)
    v = np.array([1.0, -1.0, 0.5])
    z_i = u[:, :, None] * v[None, None, :]  # (B, n, d)
    zs = params["lopa.Z_S"][None]
    cases = {"sigmoid": zs / (1 + np.exp(-z_i)), "add": zs + z_i, "max": np.maximum(zs, z_i)}
    for g, want in cases.items():
        got = materialize(PromptSpec("lopa", n_tokens=2, rank=1, head_hidden=2, gate=g), params, enc)
        assert got.shape == (2, 2, 3)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(SpecError, match="encodings"):
        materialize(PromptSpec("lopa", n_tokens=2, rank=1, head_hidden=2), params)


def test_lopa_init_gives_half_zs():
    spec = PromptSpec("lopa", n_tokens=4, rank=2, head_hidden=16)
    p = init_params(spec, 8, 0)
    enc = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    z = materialize(spec, p, enc)
    np.testing.assert_allclose(
        z, 0.5 * np.broadcast_to(p["lopa.Z_S"], z.shape), atol=0.02 * np.abs(p["lopa.Z_S"]).max()
    )
