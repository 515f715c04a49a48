"""The core library refuses user mistakes with one-line errors (issue 21, "Library API").

Each test gives the mistake a hostile new user made and checks the refusal (an exception
with a single-line message naming the argument), with the valid call beside it as the
control.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ep_jax
from ep_jax import alignment, sweep

SIZES = (8, 6, 3)


def zeros_like_init(model):
    """Zero params and buffers with the structure of `model.init` (a random dendritic init
    takes seconds to compile; these tests only need the structure)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


def one_line(excinfo, *needles):
    """The refusal's message is one line and contains every needle."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.fixture(scope="module")
def setup():
    model = ep_jax.build_model("ep", sizes=SIZES)
    est = ep_jax.Estimator("symmetric", t_free=6, t_nudge=2)
    opt = ep_jax.optim.sgd(model, lr=0.1)
    rx = ep_jax.make_relaxation(model, beta=0.2)
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, SIZES[0]))
    y = jnp.array([0, 1, 2, 1])
    return model, est, opt, rx, state, x, y


# --- 1. labels out of range ---------------------------------------------------------------


@pytest.mark.parametrize("bad", [3, -1, 99])
def test_eager_calls_refuse_out_of_range_labels(setup, bad):
    model, est, opt, rx, state, x, y = setup
    yb = y.at[2].set(bad)
    for call in (
        lambda: ep_jax.train_step(model, est, opt, None, state, x, yb, rx),
        lambda: ep_jax.estimate(model, est, None, state.params, state.buffers, x, yb, rx),
        lambda: ep_jax.evaluate(model, est, state.params, state.buffers, x, yb, rx),
        lambda: ep_jax.estimators.check_labels(model, np.asarray(yb)),
    ):
        with pytest.raises(ValueError) as e:
            call()
        one_line(e, "outside [0, 3)", "3 outputs")
    ep_jax.estimators.check_labels(model, y)  # the control


@pytest.mark.parametrize("bad", [3, -1, 99])
def test_jitted_step_refuses_out_of_range_labels(setup, bad):
    """Under jit the value cannot raise: the step is not applied (finite False), its loss
    is NaN, and so is a jitted evaluation's; valid labels are applied as before."""
    model, est, opt, rx, state, x, y = setup
    yb = y.at[2].set(bad)
    new, info = ep_jax.train_step_jit(model, est, opt, None, state, x, yb, rx)
    assert not bool(info.finite) and np.isnan(float(info.loss))
    jax.tree.map(np.testing.assert_array_equal, new, state)
    assert np.isnan(float(ep_jax.evaluate_jit(model, est, state.params, state.buffers, x, yb, rx).loss))
    _, aux = jax.jit(ep_jax.estimate, static_argnums=(0, 1))(model, est, None, state.params, state.buffers, x, yb, rx)
    assert np.isnan(float(aux.loss))
    # the control: the same batch with valid labels is applied, with a finite loss
    new, info = ep_jax.train_step_jit(model, est, opt, None, state, x, y, rx)
    assert bool(info.finite) and np.isfinite(float(info.loss)) and int(new.step) == 1
    ev = ep_jax.evaluate_jit(model, est, state.params, state.buffers, x, y, rx)
    assert np.isfinite(float(ev.loss))


def test_jitted_step_on_valid_labels_is_estimate_then_update(setup):
    """The label check does not touch the numbers: the jitted step's params equal a
    separately computed estimate followed by the optimiser's update."""
    model, est, opt, rx, state, x, y = setup
    with jax.enable_x64(True):
        model64 = model
        st = ep_jax.init_state(model64, est, opt, jax.random.PRNGKey(0), dtype=jnp.float64)
        rx64 = ep_jax.make_relaxation(model64, beta=0.2, dtype=jnp.float64)
        x64 = x.astype(jnp.float64)
        new, info = ep_jax.train_step_jit(model64, est, opt, None, st, x64, y, rx64)
        g, aux = jax.jit(ep_jax.estimate, static_argnums=(0, 1))(
            model64, est, None, st.params, st.buffers, x64, y, rx64
        )
        upd, _ = opt.update(g, st.opt_state, st.params)
        want = optax.apply_updates(st.params, upd)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), new.params, want)
        np.testing.assert_allclose(float(info.loss), float(aux.loss), rtol=1e-12)


def test_sweep_member_with_out_of_range_labels_is_frozen(setup):
    model, est, opt, rx, state, x, y = setup
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    st = sweep.init_sweep(model, est, opt, keys, keys)
    rxs = sweep.stack_relaxations(model, [rx, rx])
    ys = jnp.stack([y, y.at[0].set(7)])
    new, info = sweep.sweep_step(model, est, opt, st, jnp.stack([x, x]), ys, rxs)
    assert np.asarray(info.finite).tolist() == [True, False] and np.asarray(new.alive).tolist() == [True, False]


# --- 2. a params tree missing a leaf ------------------------------------------------------


def test_missing_leaf_is_named_with_the_model(setup):
    model, est, opt, rx, state, x, y = setup
    p = (state.params[0], {"w": state.params[1]["w"]})
    for call in (
        lambda: ep_jax.estimate(model, est, None, p, state.buffers, x, y, rx),
        lambda: ep_jax.train_step_jit(model, est, opt, None, state._replace(params=p), x, y, rx),
        lambda: ep_jax.evaluate_jit(model, est, p, state.buffers, x, y, rx),
        lambda: ep_jax.predict(model, est, p, state.buffers, x, rx),
    ):
        with pytest.raises(ValueError) as e:
            call()
        one_line(e, "params is missing the leaf [1]['b']", "'ep' model with sizes (8, 6, 3)")
    with pytest.raises(ValueError) as e:
        ep_jax.estimate(model, est, None, state.params, {}, x, y, rx)
    one_line(e, "buffers is missing the leaf ['gamma']", "'ep' model")
    extra = (state.params[0], {**state.params[1], "extra": jnp.zeros(3)})
    with pytest.raises(ValueError) as e:
        ep_jax.estimate(model, est, None, extra, state.buffers, x, y, rx)
    one_line(e, "params has the leaf [1]['extra']", "does not have")


def test_dendritic_missing_apical_maps_is_named():
    model = ep_jax.build_model("dendritic", sizes=SIZES)
    est = ep_jax.Estimator("symmetric", t_free=4, t_nudge=2)
    params, buffers = zeros_like_init(model)
    rx = ep_jax.make_relaxation(model, beta=0.2)
    x, y = jnp.ones((2, SIZES[0])), jnp.array([0, 1])
    with pytest.raises(ValueError) as e:
        ep_jax.estimate(model, est, None, {"basal": params["basal"]}, buffers, x, y, rx)
    one_line(e, "params is missing the leaf ['apical'][0]['w']", "'dendritic' model")
    with pytest.raises(ValueError) as e:
        alignment.gdu(model, est, params, {"alpha": buffers["alpha"]}, x, y, rx)
    one_line(e, "buffers is missing the leaves ['masks']", "'dendritic' model")
    g, _ = jax.jit(ep_jax.estimate, static_argnums=(0, 1))(model, est, None, params, buffers, x, y, rx)  # control
    assert jax.tree.structure(g) == jax.tree.structure(params)


# --- 3. an optimiser state made by another optimiser --------------------------------------


def test_optimiser_refuses_another_optimisers_state(setup):
    model, est, opt, rx, state, x, y = setup
    sgd, adam = ep_jax.optim.sgd(model, lr=0.1), ep_jax.optim.adam(model, lr=0.1)
    g = jax.tree.map(jnp.ones_like, state.params)
    cases = (
        (adam, sgd.init(state.params), "ep_jax.optim.adam"),
        (sgd, adam.init(state.params), "ep_jax.optim.sgd"),
        (adam, optax.adam(1e-3).init(state.params), "ep_jax.optim.adam"),
    )
    for tx, foreign, name in cases:
        with pytest.raises(ValueError) as e:
            tx.update(g, foreign, state.params)
        one_line(e, "opt_state was made by", f"not by {name}")
    with pytest.raises(ValueError) as e:  # inside the training step too
        ep_jax.train_step_jit(model, est, adam, None, state, x, y, rx)
    one_line(e, "opt_state was made by an optimiser with hyperparameters ['lr', 'momentum']")
    other = ep_jax.build_model("ep", sizes=(8, 6, 5, 3))
    with pytest.raises(ValueError) as e:
        sgd.update(g, ep_jax.optim.sgd(other, lr=0.1).init(state.params), state.params)
    one_line(e, "lr of shape (3,), expected (2,)", "another model")
    for tx in (sgd, adam):  # the control: each optimiser's own state
        upd, _ = tx.update(g, tx.init(state.params), state.params)
        assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(upd))


# --- 4. negative rates, momentum outside [0, 1) -------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda m: ep_jax.optim.sgd(m, lr=-1), "lr must be >= 0"),
        (lambda m: ep_jax.optim.sgd(m, lr=[0.1, -0.2]), "lr must be >= 0"),
        (lambda m: ep_jax.optim.adam(m, lr=-1e-3), "lr must be >= 0"),
        (lambda m: ep_jax.optim.sgd(m, lr=float("inf")), "lr must be finite"),
        (lambda m: ep_jax.optim.sgd(m, momentum=1.0), "momentum must lie in [0, 1)"),
        (lambda m: ep_jax.optim.sgd(m, momentum=-0.1), "momentum must lie in [0, 1)"),
        (lambda m: ep_jax.optim.sgd(m, momentum=1.5), "momentum must lie in [0, 1)"),
    ],
)
def test_bad_rates_and_momentum_are_refused(make, match):
    model = ep_jax.build_model("ep", sizes=SIZES)
    with pytest.raises(ValueError) as e:
        make(model)
    one_line(e, match)


def test_with_hyperparams_refuses_bad_values_and_accepts_edges(setup):
    model, est, opt, rx, state, x, y = setup
    s = ep_jax.optim.sgd(model, lr=0.1).init(state.params)
    with pytest.raises(ValueError) as e:
        ep_jax.optim.with_hyperparams(s, lr=jnp.array([0.1, -0.1]))
    one_line(e, "lr must be >= 0")
    with pytest.raises(ValueError) as e:
        ep_jax.optim.with_hyperparams(s, momentum=jnp.asarray(1.0))
    one_line(e, "momentum must lie in [0, 1)")
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    opt = ep_jax.optim.sgd(model, lr=0.1)
    with pytest.raises(ValueError) as e:  # a sweep's per-member values, before the vmapped init
        sweep.init_sweep(model, est, opt, keys, keys, opt_hyperparams={"momentum": jnp.array([0.9, 1.0])})
    one_line(e, "momentum must lie in [0, 1)")
    with pytest.raises(ValueError) as e:
        sweep.init_sweep(model, est, opt, keys, keys, opt_hyperparams={"lr": jnp.array([[0.1, 0.1], [0.1, -1.0]])})
    one_line(e, "lr must be >= 0")
    # the controls: a zero rate (a frozen synapse) and zero momentum are valid
    ep_jax.optim.sgd(model, lr=[0.0, 0.1], momentum=0.0)
    s2 = ep_jax.optim.with_hyperparams(s, lr=jnp.array([0.0, 0.2]), momentum=jnp.asarray(0.0))
    assert np.asarray(s2.hyperparams["lr"]).tolist() == pytest.approx([0.0, 0.2])


# --- 5. another model's params ------------------------------------------------------------


def test_another_models_params_are_refused_naming_leaf_and_shapes(setup):
    model, est, opt, rx, state, x, y = setup
    other = ep_jax.build_model("ep", sizes=(8, 5, 3))
    p, b = other.init(jax.random.PRNGKey(0))
    for call in (
        lambda: ep_jax.evaluate(model, est, p, b, x, y, rx),
        lambda: ep_jax.evaluate_jit(model, est, p, b, x, y, rx),
        lambda: ep_jax.train_step_jit(model, est, opt, None, state._replace(params=p), x, y, rx),
        lambda: ep_jax.make_ep_block(model, est)(p, b, x, rx),
    ):
        with pytest.raises(ValueError) as e:
            call()
        msg = one_line(e, "params leaf [0]", "has shape (5,", "expected (6,", "sizes (8, 6, 3)")
        assert "dot_general" not in msg
    dend = ep_jax.build_model("dendritic", sizes=SIZES)
    dp, db = zeros_like_init(dend)
    with pytest.raises(ValueError) as e:
        ep_jax.evaluate(model, est, dp, db, x, y, rx)
    one_line(e, "params is missing the leaves [0]['b']", "'ep' model")


def test_the_shape_check_costs_nothing_per_step(setup):
    """The check runs on shapes at trace time: one trace, then cached calls."""
    model, est, opt, rx, state, x, y = setup
    traces = []

    def step(state, x, y):
        traces.append(1)
        return ep_jax.train_step(model, est, opt, None, state, x, y, rx)

    f = jax.jit(step)
    for _ in range(3):
        f(state, x, y)
    assert len(traces) == 1


# --- 6. a step on 0 examples --------------------------------------------------------------


def test_empty_batch_is_refused(setup):
    model, est, opt, rx, state, x, y = setup
    x0, y0 = jnp.zeros((0, SIZES[0])), jnp.zeros((0,), jnp.int32)
    for call in (
        lambda: ep_jax.train_step(model, est, opt, None, state, x0, y0, rx),
        lambda: ep_jax.train_step_jit(model, est, opt, None, state, x0, y0, rx),
        lambda: ep_jax.estimate(model, est, None, state.params, state.buffers, x0, y0, rx),
        lambda: ep_jax.evaluate_jit(model, est, state.params, state.buffers, x0, y0, rx),
    ):
        with pytest.raises(ValueError) as e:
            call()
        one_line(e, "x must hold at least one example (batch >= 1)", "(0, 8)")
    _, info = ep_jax.train_step_jit(model, est, opt, None, state, x[:1], y[:1], rx)  # the control: one example
    assert bool(info.finite)


# --- 7. beta = 0 --------------------------------------------------------------------------


def test_beta_zero_is_said_once_where_it_is_known():
    model = ep_jax.build_model("ep", sizes=SIZES)
    with pytest.warns(UserWarning, match=r"beta=0: the EP estimators .* every training step is refused"):
        ep_jax.make_relaxation(model, beta=0.0)
    for kind in ("symmetric", "one_sided", "chl"):
        with pytest.raises(ValueError) as e:
            ep_jax.make_relaxation(model, beta=0.0, est=ep_jax.Estimator(kind, 6, 2))
        one_line(e, f"beta must be nonzero for the '{kind}' EP estimator")
    with warnings.catch_warnings():  # the controls: BPTT may use beta=0; beta != 0 is silent
        warnings.simplefilter("error")
        rx = ep_jax.make_relaxation(model, beta=0.0, est=ep_jax.Estimator("bptt", 6, 2))
        assert float(rx.beta) == 0.0
        ep_jax.make_relaxation(model, beta=0.1)
        ep_jax.make_relaxation(model, beta=0.1, est=ep_jax.Estimator("symmetric", 6, 2))


CONV = dict(input_shape=(12, 12, 1), channels=(4,), kernels=(3,), strides=(1,), paddings=(0,), pools=("max",), fc=(3,))


@pytest.mark.parametrize(
    "kind,kw,needle",
    [
        ("ep", dict(sizes=(16, 12.5, 4)), "sizes must hold whole numbers"),
        ("ep", dict(sizes=(16, True, 4)), "sizes must hold whole numbers"),
        ("ep", dict(sizes=(16, "12", 4)), "sizes must hold whole numbers"),
        ("dendritic", dict(sizes=(16, 12, 4), basal_branches=2.5), "basal_branches must be a whole number"),
        ("dendritic", dict(sizes=(16, 12, 4), apical_branches=True), "apical_branches must be a whole number"),
        ("dendritic", dict(sizes=(16, 12, 4), basal_branches=0), "basal_branches must be >= 1"),
        ("dendritic", dict(sizes=(16, 12, 4), sparsity="0.5"), "sparsity must be a number"),
        ("dendritic", dict(sizes=(16, 12, 4), apical_dense=1), "apical_dense must be True or False"),
        ("conv", dict(CONV, channels=(True,)), "channels must hold whole numbers"),
        ("conv", dict(CONV, kernels=(3.5,)), "kernels must hold whole numbers"),
        ("dendritic_conv", dict(CONV, basal_branches=1.5), "basal_branches must be a whole number"),
    ],
)
def test_model_fields_are_never_silently_coerced(kind, kw, needle):
    with pytest.raises(ValueError) as e:
        ep_jax.build_model(kind, **kw)
    one_line(e, needle)


def test_integral_numbers_of_any_type_are_accepted():
    """The control: numpy integers and integral floats (from a config file) build the same model."""
    a = ep_jax.build_model("ep", sizes=(16, np.int64(12), 4.0))
    assert a.sizes == (16, 12, 4) and all(type(n) is int for n in a.sizes)
    assert a == ep_jax.build_model("ep", sizes=(16, 12, 4))
    d = ep_jax.build_model("dendritic", sizes=(16, 12, 4), basal_branches=np.int32(3), apical_branches=2.0)
    assert (d.basal_branches, d.apical_branches) == (3, 2) and type(d.basal_branches) is int
    c = ep_jax.build_model("conv", **dict(CONV, channels=(np.int64(4),), kernels=(3.0,)))
    assert c.channels == (4,) and c.kernels == (3,)


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda m: ep_jax.make_relaxation(m, beta="0.1"), "beta must be a number, got '0.1'"),
        (lambda m: ep_jax.make_relaxation(m, beta=True), "beta must be a number, got True"),
        (lambda m: ep_jax.make_relaxation(m, beta=0.1, dt="0.5"), "dt must be a number"),
        (
            lambda m: ep_jax.make_relaxation(m, beta=0.1, dt=[np.ones(6, bool), 0.5]),
            "dt must be a number, got a bool array of shape (6,)",
        ),
        (lambda m: ep_jax.optim.sgd(m, lr="0.1"), "lr must be a number"),
        (lambda m: ep_jax.optim.sgd(m, lr=[0.1, True]), "lr must be a number, got True"),
        (lambda m: ep_jax.optim.adam(m, lr="1e-3"), "lr must be a number"),
        (lambda m: ep_jax.optim.sgd(m, lr=0.1, weight_decay="0"), "weight_decay must be a number"),
        (
            lambda m: ep_jax.init_state(
                m, ep_jax.Estimator("symmetric"), ep_jax.optim.sgd(m, lr=0.1), jax.random.PRNGKey(0), gamma=True
            ),
            "setting gamma must be a number",
        ),
        (
            lambda m: sweep.init_sweep(
                m,
                ep_jax.Estimator("symmetric"),
                ep_jax.optim.sgd(m, lr=0.1),
                [jax.random.PRNGKey(0)],
                [jax.random.PRNGKey(1)],
                opt_hyperparams={"lr": np.ones((1, 2), bool)},
            ),
            "lr must be a number",
        ),
    ],
)
def test_text_or_bool_for_a_number_is_refused(call, needle):
    """Strings and bools were read as numbers ("0.1" -> 0.1, True -> 1.0); the same calls
    with numbers are the controls of the tests above."""
    model = ep_jax.build_model("ep", sizes=SIZES)
    with pytest.raises(ValueError) as e:
        call(model)
    one_line(e, needle)
