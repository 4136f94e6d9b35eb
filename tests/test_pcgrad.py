"""Tests for train.pcgrad (PCGrad via the Gram-matrix formulation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.pcgrad import combine, gram_matrix, project


def _np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


# ---------------------------------------------------------------------------
# Independent numpy reference: the naive loop on flattened vectors, float64.
# ---------------------------------------------------------------------------


def _flatten(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(tree)])


def _unflatten(vec, like):
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, off = [], 0
    for leaf in leaves:
        n = np.size(leaf)
        out.append(vec[off : off + n].reshape(np.shape(leaf)))
        off += n
    return jax.tree_util.tree_unflatten(treedef, out)


def _reference_order(key, i, T):
    # The documented order: jax.random.permutation(jax.random.fold_in(key, i), T)
    # with task i removed; key=None -> 0..T-1 without i.
    if key is None:
        return [j for j in range(T) if j != i]
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, i), T))
    return [int(j) for j in perm if j != i]


def naive_pcgrad(task_grads, key):
    gs = [_flatten(g) for g in task_grads]
    T = len(gs)
    out = []
    for i in range(T):
        gi = gs[i].copy()
        for j in _reference_order(key, i, T):
            gj = gs[j]
            dot = gi @ gj
            nj = gj @ gj
            if dot < 0 and nj > 0:
                gi = gi - dot / nj * gj
        out.append(_unflatten(gi, task_grads[0]))
    return out


def _random_tree(rng, scale=1.0):
    return {
        "emb": {"w": rng.normal(size=(7, 5)).astype(np.float32) * scale},
        "layers": [
            {"w": rng.normal(size=(5, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)},
            {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)},
        ],
        "scalar": np.float32(rng.normal()),
    }


def _assert_trees_close(a, b, **kw):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


# ---------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------


def test_two_tasks_by_hand():
    # g1 = [1, 0], g2 = [-1, 1]: g1.g2 = -1 < 0, |g1|^2 = 1, |g2|^2 = 2.
    # g1' = g1 - (-1/2) g2 = [1, 0] + [-0.5, 0.5] = [0.5, 0.5]
    # g2' = g2 - (-1/1) g1 = [-1, 1] + [1, 0]     = [0, 1]
    g1 = jnp.array([1.0, 0.0])
    g2 = jnp.array([-1.0, 1.0])
    for key in (None, jax.random.key(3)):  # with 2 tasks the order is irrelevant
        p1, p2 = project([g1, g2], key)
        np.testing.assert_allclose(p1, [0.5, 0.5], atol=1e-7)
        np.testing.assert_allclose(p2, [0.0, 1.0], atol=1e-7)
        np.testing.assert_allclose(combine([g1, g2], key), [0.5, 1.5], atol=1e-7)
        np.testing.assert_allclose(combine([g1, g2], key, reduction="mean"), [0.25, 0.75], atol=1e-7)


def test_three_tasks_fixed_order_by_hand():
    # g1 = [1, 0], g2 = [-1, 1], g3 = [0, -1]; fixed order 0,1,2 (skipping i).
    # task 1: vs g2: [1,0].[-1,1] = -1 -> [1,0] + 1/2 [-1,1] = [0.5, 0.5]
    #         vs g3: [0.5,0.5].[0,-1] = -0.5 -> + 0.5 [0,-1] = [0.5, 0.0]
    # task 2: vs g1: [-1,1].[1,0] = -1 -> + 1 [1,0] = [0, 1]
    #         vs g3: [0,1].[0,-1] = -1 -> + 1 [0,-1] = [0, 0]
    # task 3: vs g1: [0,-1].[1,0] = 0 (no conflict) -> unchanged
    #         vs g2: [0,-1].[-1,1] = -1 -> + 1/2 [-1,1] = [-0.5, -0.5]
    # sum = [0.0, -0.5]
    g = [jnp.array([1.0, 0.0]), jnp.array([-1.0, 1.0]), jnp.array([0.0, -1.0])]
    p = project(g, None)
    np.testing.assert_allclose(p[0], [0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(p[1], [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(p[2], [-0.5, -0.5], atol=1e-7)
    np.testing.assert_allclose(combine(g, None), [0.0, -0.5], atol=1e-7)
    # Order matters: task 1 visiting g3 first finds no conflict, then projects on g2 -> [0.5, 0.5].
    p_rev = naive_pcgrad([g[0], g[2], g[1]], None)[0]
    np.testing.assert_allclose(p_rev, [0.5, 0.5], atol=1e-7)


def test_non_conflicting_unchanged():
    rng = np.random.default_rng(1)
    base = _random_tree(rng)
    # positive multiples of one tree plus a small same-direction jitter: all dots > 0
    grads = [jax.tree_util.tree_map(lambda x, s=s: x * s, base) for s in (1.0, 0.5, 3.0)]
    G = np.asarray(gram_matrix(grads))
    assert (G > 0).all()
    out = project(grads, jax.random.key(0))
    for g, o in zip(grads, out):
        _assert_trees_close(o, g, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Against the independent numpy reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_reference(T, seed):
    rng = np.random.default_rng(100 * T + seed)
    # mixed scales so some pairs conflict and others do not
    grads = [_random_tree(rng, scale=float(rng.uniform(0.1, 3.0))) for _ in range(T)]
    for key in (None, jax.random.key(seed), jax.random.PRNGKey(seed + 17)):
        got = project(grads, key)
        want = naive_pcgrad(grads, key)
        for g, w in zip(got, want):
            _assert_trees_close(g, w, rtol=1e-4, atol=1e-5)
        want_sum = _unflatten(sum(_flatten(w) for w in want), grads[0])
        _assert_trees_close(combine(grads, key), want_sum, rtol=1e-4, atol=1e-5)
        _assert_trees_close(
            combine(grads, key, reduction="mean"),
            jax.tree_util.tree_map(lambda x: x / T, want_sum),
            rtol=1e-4,
            atol=1e-5,
        )


def test_random_order_differs_from_fixed_somewhere():
    # sanity: the key actually changes the order (for some task / key)
    rng = np.random.default_rng(5)
    grads = [rng.normal(size=(6,)).astype(np.float32) for _ in range(4)]
    fixed = project(grads, None)
    differs = False
    for s in range(10):
        rnd = project(grads, jax.random.key(s))
        differs |= any(not np.allclose(a, b, atol=1e-6) for a, b in zip(fixed, rnd))
    assert differs


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


def test_jit():
    rng = np.random.default_rng(7)
    grads = [_random_tree(rng) for _ in range(3)]
    key = jax.random.key(11)
    eager = project(grads, key)
    jitted = jax.jit(project)(grads, key)
    for a, b in zip(eager, jitted):
        _assert_trees_close(a, b, rtol=1e-6, atol=1e-6)
    _assert_trees_close(jax.jit(combine)(grads, key), combine(grads, key), rtol=1e-6, atol=1e-6)
    _assert_trees_close(
        jax.jit(combine, static_argnames="reduction")(grads, None, reduction="mean"),
        combine(grads, None, reduction="mean"),
        rtol=1e-6,
        atol=1e-6,
    )
    # key as a traced argument: different keys reuse the compiled function
    f = jax.jit(combine)
    for s in range(3):
        _assert_trees_close(f(grads, jax.random.key(s)), combine(grads, jax.random.key(s)), rtol=1e-6, atol=1e-6)


def test_zero_gradient_task():
    rng = np.random.default_rng(3)
    g0 = _random_tree(rng)
    g1 = _random_tree(rng)
    zero = jax.tree_util.tree_map(np.zeros_like, g0)
    out = project([g0, zero, g1], jax.random.key(2))
    for leaf in jax.tree_util.tree_leaves(out):
        assert np.isfinite(np.asarray(leaf)).all()
    # the zero task stays zero (it is only ever projected by multiples of... nothing: 0 . g = 0)
    for leaf in jax.tree_util.tree_leaves(out[1]):
        np.testing.assert_array_equal(np.asarray(leaf), 0)
    # the others behave as if the zero task were absent
    without = project([g0, g1], None)
    _assert_trees_close(out[0], without[0], rtol=1e-5, atol=1e-6)
    _assert_trees_close(out[2], without[1], rtol=1e-5, atol=1e-6)
    # all tasks zero
    out = combine([zero, zero, zero], None)
    for leaf in jax.tree_util.tree_leaves(out):
        np.testing.assert_array_equal(np.asarray(leaf), 0)


def test_invariant_to_leaf_split():
    rng = np.random.default_rng(9)
    T, n = 4, 60
    vecs = [rng.normal(size=n).astype(np.float32) * rng.uniform(0.2, 2) for _ in range(T)]
    key = jax.random.key(4)
    flat = project([jnp.asarray(v) for v in vecs], key)

    def split(v):
        return {"a": v[:7].reshape(7, 1), "b": [v[7:27].reshape(4, 5), v[27:28]], "c": v[28:].reshape(2, 16)}

    def unsplit(t):
        return np.concatenate([np.asarray(t["a"]).ravel(), np.asarray(t["b"][0]).ravel(),
                               np.asarray(t["b"][1]).ravel(), np.asarray(t["c"]).ravel()])

    tree = project([split(v) for v in vecs], key)
    for f, t in zip(flat, tree):
        np.testing.assert_allclose(unsplit(t), np.asarray(f), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(unsplit(combine([split(v) for v in vecs], key)),
                               np.asarray(combine([jnp.asarray(v) for v in vecs], key)), rtol=1e-5, atol=1e-6)


def test_dtype_preserved_and_structure_checked():
    g = [{"w": jnp.ones((3,), jnp.bfloat16)}, {"w": -jnp.ones((3,), jnp.bfloat16)}]
    out = project(g, None)
    assert out[0]["w"].dtype == jnp.bfloat16
    with pytest.raises(ValueError):
        project([{"w": jnp.ones(3)}, {"v": jnp.ones(3)}], None)
    with pytest.raises(ValueError):
        combine(g, None, reduction="max")
