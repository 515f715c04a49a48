"""Short real training runs on a learnable synthetic problem (EP, DEP, truncated BPTT),
the optimisers (per-synapse SGD, any optax transformation, vmapped learning rates), and
the multi-step scan against a loop of single steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close, synthetic_problem

import ep_jax


def train(kind, est, lr=None, beta=0.2, epochs=4, batch=32, seed=0, opt=None, **model_kw):
    (xtr, ytr), (xte, yte) = synthetic_problem(jax.random.PRNGKey(123))
    model = ep_jax.build_model(kind, sizes=(16, 32, 4), **model_kw)
    rx = ep_jax.make_relaxation(model, beta=beta)
    opt = opt(model) if opt is not None else ep_jax.optim.sgd(model, lr=lr, momentum=0.9)
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(seed))
    ev0 = ep_jax.evaluate_jit(model, est, state.params, state.buffers, xte, yte, rx)
    key = jax.random.PRNGKey(seed + 1)
    losses = []
    for _ in range(epochs):
        key, sub = jax.random.split(key)
        perm = jax.random.permutation(sub, len(ytr))
        for i in range(0, len(ytr) - batch + 1, batch):
            idx = perm[i : i + batch]
            state, info = ep_jax.train_step_jit(
                model, est, opt, ep_jax.step_key(key, state.step), state, xtr[idx], ytr[idx], rx
            )
            assert bool(info.finite)
            losses.append(float(info.loss))
    ev = ep_jax.evaluate_jit(model, est, state.params, state.buffers, xte, yte, rx)
    assert float(ev.accuracy) == pytest.approx(int(ev.correct) / len(yte))
    return float(ev0.accuracy), float(ev.accuracy), state, (float(ev0.loss), float(ev.loss)), losses


@pytest.mark.parametrize(
    "kind,est_kind,lr",
    [
        ("ep", "symmetric", (0.2, 0.1)),
        ("dendritic", "symmetric", (0.5, 0.2)),
        ("dendritic", "bptt", (0.5, 0.2)),
        ("ep", "bptt", (0.2, 0.1)),
    ],
)
def test_short_training_learns(kind, est_kind, lr):
    est = ep_jax.Estimator(est_kind, t_free=30, t_nudge=8)
    acc0, acc, _, (l0, l1), _ = train(kind, est, lr)
    print(f"{kind}/{est_kind}: test accuracy {acc0:.3f} -> {acc:.3f}, loss {l0:.4f} -> {l1:.4f}")
    assert acc > 0.85, (acc0, acc)
    assert acc > acc0 + 0.3
    assert l1 < 0.7 * l0


def test_training_with_cross_entropy_and_random_sign_nudging_learns():
    """loss="ce" (identity output, softmax cross-entropy nudge) with the one-sided
    estimate and random-sign β: the estimate is unbiased on average and the network learns."""
    est = ep_jax.Estimator("one_sided", t_free=30, t_nudge=8, nudge="random_sign")
    acc0, acc, _, (l0, l1), _ = train("ep", est, (0.1, 0.05), loss="ce", activation="sigmoid")
    print(f"ep/ce/random_sign: test accuracy {acc0:.3f} -> {acc:.3f}, loss {l0:.4f} -> {l1:.4f}")
    assert acc > 0.85 and acc > acc0 + 0.3, (acc0, acc)
    assert l1 < 0.6 * l0


def test_training_with_optax_adam_learns():
    """Any optax transformation goes through the library's train_step: plain optax.adam."""
    est = ep_jax.Estimator("symmetric", t_free=30, t_nudge=8)
    acc0, acc, state, (l0, l1), losses = train("dendritic", est, opt=lambda m: optax.adam(1e-2), epochs=3)
    print(f"dendritic/adam: test accuracy {acc0:.3f} -> {acc:.3f}, loss {l0:.4f} -> {l1:.4f}")
    assert isinstance(state.opt_state[0], optax.ScaleByAdamState)
    assert int(state.opt_state[0].count) == int(state.step) == 3 * 32
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    assert l1 < 0.6 * l0 and acc > 0.8 and acc > acc0 + 0.3, (acc0, acc, l0, l1)


def test_same_seed_same_training():
    est = ep_jax.Estimator("symmetric", t_free=20, t_nudge=5)
    _, a1, s1, _, _ = train("dendritic", est, (0.5, 0.2), epochs=1)
    _, a2, s2, _, _ = train("dendritic", est, (0.5, 0.2), epochs=1)
    _, _, s3, _, _ = train("dendritic", est, (0.5, 0.2), epochs=1, seed=5)
    assert a1 == a2
    jax.tree.map(np.testing.assert_array_equal, s1, s2)
    assert not np.array_equal(s1.params["basal"][0]["w"], s3.params["basal"][0]["w"])


def test_momentum_follows_pytorch_semantics(x64):
    """v ← μ v + g; θ ← θ − lr·v, one rate per synapse (apical uses the next synapse's)."""
    model = ep_jax.build_model("dendritic", sizes=(7, 6, 5, 4), basal_branches=3, apical_branches=2)
    rx = ep_jax.make_relaxation(model, beta=0.2)
    opt = ep_jax.optim.sgd(model, lr=[0.3, 0.2, 0.1], momentum=0.9)
    est = ep_jax.Estimator("symmetric", 10, 4)
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(state.opt_state.hyperparams["lr"], [0.3, 0.2, 0.1])
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 7), jnp.float64)
    y = jnp.array([0, 1, 2, 3])
    p, v = state.params, jax.tree.map(jnp.zeros_like, state.params)
    rates = {
        "basal": ({"w": 0.3, "c": 0.3}, {"w": 0.2, "c": 0.2}, {"w": 0.1, "c": 0.1}),
        "apical": ({"w": 0.2}, {"w": 0.1}),
    }
    for t in range(3):
        g, _ = jax.jit(ep_jax.estimate, static_argnums=(0, 1))(model, est, None, p, state.buffers, x, y, rx)
        state, _ = ep_jax.train_step_jit(model, est, opt, jax.random.PRNGKey(t), state, x, y, rx)
        v = jax.tree.map(lambda v, g: 0.9 * v + g, v, g)
        p = jax.tree.map(lambda p, v, r: p - r * v, p, v, rates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15), state.params, p)
    assert int(state.step) == 3


def test_vmapped_learning_rates_equal_solo_runs():
    """The default optimiser keeps its per-synapse rates as arrays in its state: set with
    `optim.with_hyperparams` under jax.vmap, member i trains exactly as a solo run built
    with rates i."""
    model = ep_jax.build_model("dendritic", sizes=(16, 32, 4))
    est = ep_jax.Estimator("symmetric", 20, 5)
    rx = ep_jax.make_relaxation(model, beta=0.2)
    (xtr, ytr), _ = synthetic_problem(jax.random.PRNGKey(4), n_train=96, n_test=1)
    rates = jnp.array([[0.5, 0.2], [0.1, 0.05], [0.0, 0.3]])
    opt = ep_jax.optim.sgd(model, lr=0.05, momentum=0.9)
    base = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(7)

    idx = jnp.arange(96).reshape(3, 32)

    def run(opt, state):  # three steps on three batches
        return ep_jax.train_steps(model, est, opt, key, state, xtr, ytr, idx, rx)[0]

    def member(lr):
        st = base._replace(opt_state=ep_jax.optim.with_hyperparams(base.opt_state, lr=lr))
        return run(opt, st)

    stacked = jax.jit(jax.vmap(member))(rates)

    @jax.jit
    def solo_run(lr):  # an optimiser built with these rates, a fresh state (as init_state), the same steps
        solo_opt = ep_jax.optim.sgd(model, lr=lr, momentum=0.9)
        return run(solo_opt, base._replace(opt_state=solo_opt.init(base.params)))

    for i in range(len(rates)):
        solo = solo_run(rates[i])
        assert_trees_close(jax.tree.map(lambda a: a[i], stacked.params), solo.params, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(stacked.opt_state.hyperparams["lr"][i], rates[i])
    # the members really differ (rate 0 on synapse 1 leaves its basal map untouched)
    np.testing.assert_array_equal(stacked.params["basal"][0]["w"][2], base.params["basal"][0]["w"])
    assert not np.allclose(stacked.params["basal"][0]["w"][0], stacked.params["basal"][0]["w"][1])
    with pytest.raises(ValueError, match=r"hyperparameter lr must have shape \(2,\)"):
        ep_jax.optim.with_hyperparams(base.opt_state, lr=jnp.ones(3))
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        ep_jax.optim.with_hyperparams(base.opt_state, eps=1.0)
    with pytest.raises(ValueError, match="no injected hyperparameters"):
        ep_jax.optim.with_hyperparams(optax.adam(1e-3).init(base.params), lr=0.1)


def test_train_steps_equals_loop_of_train_step_with_step_key():
    """`train_steps` (one lax.scan) is exactly a loop of `train_step` with the key
    `step_key(key, state.step)` and batches `x_all[idx[i]]` (random-sign nudging, so the
    keys matter)."""
    model = ep_jax.build_model("ep", sizes=(16, 12, 4), activation="sigmoid")
    est = ep_jax.Estimator("one_sided", 15, 5, nudge="random_sign")
    rx = ep_jax.make_relaxation(model, beta=0.2)
    opt = ep_jax.optim.sgd(model, lr=[0.2, 0.1])
    (xtr, ytr), _ = synthetic_problem(jax.random.PRNGKey(5), n_train=64, n_test=1)
    idx = jax.random.randint(jax.random.PRNGKey(6), (6, 16), 0, 64)
    key = jax.random.PRNGKey(9)
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
    state = state._replace(step=jnp.asarray(3, jnp.int32))  # keys follow the state's counter
    scanned, infos = ep_jax.train_steps_jit(model, est, opt, key, state, xtr, ytr, idx, rx)
    step = jax.jit(ep_jax.train_step, static_argnums=(0, 1, 2))
    looped, betas = state, []
    for i in range(idx.shape[0]):
        looped, info = step(model, est, opt, ep_jax.step_key(key, looped.step), looped, xtr[idx[i]], ytr[idx[i]], rx)
        betas.append(float(info.beta))
        np.testing.assert_allclose(infos.loss[i], info.loss, rtol=1e-6)
    assert_trees_close(scanned, looped, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(infos.beta, betas)
    assert set(np.sign(betas)) == {-1.0, 1.0}  # both signs drawn over the six steps
    assert int(scanned.step) == 3 + 6 and infos.loss.shape == (6,)


# --- divergence is judged on the new state ------------------------------------------------


def overflowing(factor):
    """SGD whose update is multiplied by `factor` twice (an injected hyperparameter, so
    sweep members differ): with factor 1e30 every nonzero update is ±inf in float32 at the
    very first step, while the loss and the gradients stay finite."""

    def make(lr, factor):
        return optax.chain(optax.sgd(lr), optax.scale(factor), optax.scale(factor))

    return optax.inject_hyperparams(make)(lr=0.1, factor=factor)


def moment_overflow():
    """Updates of zero, but an optimiser state that accumulates the gradient times 1e60:
    the parameters stay finite, the optimiser state overflows at the first step."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(updates, state, params=None):
        state = jax.tree.map(lambda s, g: s + g * 1e30 * 1e30, state, updates)
        return jax.tree.map(jnp.zeros_like, updates), state

    return optax.GradientTransformation(init, update)


def _tiny(kind="ep"):
    (xtr, ytr), _ = synthetic_problem(jax.random.PRNGKey(3), n_train=64, n_test=8)
    model = ep_jax.build_model(kind, sizes=(16, 12, 4))
    est = ep_jax.Estimator("symmetric", t_free=10, t_nudge=3)
    rx = ep_jax.make_relaxation(model, beta=0.2, dt=0.5)
    return model, est, rx, xtr[:16], ytr[:16]


def _leaves_equal(a, b):
    return all(
        np.array_equal(np.asarray(u), np.asarray(v))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("make_opt,where", [(lambda: overflowing(1e30), "params"), (moment_overflow, "opt_state")])
@pytest.mark.parametrize("jit", [False, True])
def test_step_that_overflows_the_new_state_is_refused(make_opt, where, jit):
    """Loss and gradients finite, the updated parameters (or optimiser state) not: the
    step is refused at once (`info.finite` False) and the input state is returned."""
    model, est, rx, x, y = _tiny()
    opt = make_opt()
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
    step = ep_jax.train_step_jit if jit else ep_jax.train_step
    new, info = step(model, est, opt, jax.random.PRNGKey(1), state, x, y, rx)
    assert np.isfinite(float(info.loss)) and np.isfinite(float(info.grad_norm)) and float(info.grad_norm) > 0
    # the update itself, computed here from the same gradients, is not finite
    grads, _ = ep_jax.estimate(model, est, jax.random.PRNGKey(1), state.params, state.buffers, x, y, rx)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    bad = optax.apply_updates(state.params, updates) if where == "params" else opt_state
    assert not all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree.leaves(bad))
    assert not bool(info.finite)
    assert _leaves_equal(new, state)


def test_data_parallel_step_refuses_an_overflowing_update():
    model, est, rx, x, y = _tiny()
    opt = overflowing(1e30)
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
    step = ep_jax.parallel.data_parallel_step(model, est, opt)
    new, info = step(jax.random.PRNGKey(1), state, x, y, rx)
    assert np.isfinite(float(info.loss)) and not bool(info.finite)
    assert _leaves_equal(new, state)
    # the same step with a sane factor is applied
    ok = overflowing(1.0)
    s1 = ep_jax.init_state(model, est, ok, jax.random.PRNGKey(0))
    n1, i1 = ep_jax.parallel.data_parallel_step(model, est, ok)(jax.random.PRNGKey(1), s1, x, y, rx)
    assert bool(i1.finite) and int(n1.step) == 1 and not _leaves_equal(n1.params, s1.params)


# --- batch indices into a resident dataset ------------------------------------------------


def test_indices_past_the_data_are_refused_not_clamped():
    model, est, rx, x, y = _tiny()
    opt = ep_jax.optim.sgd(model, lr=0.1)
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
    good = jnp.arange(8).reshape(2, 4)
    for bad in (jnp.array([[0, 1, 2, 3], [14, 15, 16, 17]]), np.array([[-1, 0, 1, 2]])):
        with pytest.raises(ValueError, match=r"batch indices must lie in \[0, 16\).*got indices from"):
            ep_jax.train_steps_jit(model, est, opt, jax.random.PRNGKey(1), state, x, y, bad, rx)
        with pytest.raises(ValueError, match=r"batch indices must lie in \[0, 16\)"):
            ep_jax.train_steps(model, est, opt, jax.random.PRNGKey(1), state, x, y, bad, rx)
    with pytest.raises(ValueError, match="same number of examples, got 16 and 15"):
        ep_jax.train_steps_jit(model, est, opt, jax.random.PRNGKey(1), state, x, y[:15], good, rx)
    # under an outer jit the indices are not known: the step with an index past the end is
    # refused (the state is kept), the other applied exactly as with valid indices alone
    run = jax.jit(lambda st, ix: ep_jax.train_steps(model, est, opt, jax.random.PRNGKey(1), st, x, y, ix, rx))
    st_bad, info = run(state, jnp.array([[0, 1, 2, 3], [4, 5, 6, 16]]))
    assert np.asarray(info.finite).tolist() == [True, False]
    st_one, _ = run(state, jnp.array([[0, 1, 2, 3]]))
    assert _leaves_equal(st_bad, st_one)
    from ep_jax import sweep as S

    sw = S.init_sweep(model, est, opt, [jax.random.PRNGKey(0)], [jax.random.PRNGKey(1)])
    srx = S.stack_relaxations(model, [rx])
    with pytest.raises(ValueError, match=r"batch indices must lie in \[0, 16\)"):
        S.sweep_steps_jit(model, est, opt, sw, x, y, jnp.array([[16, 0, 1, 2]]), srx)
