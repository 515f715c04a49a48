"""Shared test helpers: a small learnable synthetic problem, float64 scoping, and an
independent numpy implementation of both models (relaxation, primitive gradients,
estimators) that the library is checked against."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ep_jax


def synthetic_problem(key, n_train=1024, n_test=512, n_in=16, n_classes=4, noise=0.6):
    """Seeded noisy-prototype problem shaped like image data: each class has a random
    binary prototype in [0, 1]^n_in; examples are the prototype plus Gaussian noise,
    clipped to [0, 1]. Learnable by any of our networks, far from trivial at chance."""
    k_p, k_y, k_n = jax.random.split(key, 3)
    protos = jax.random.bernoulli(k_p, 0.5, (n_classes, n_in)).astype(jnp.float32)
    y = jax.random.randint(k_y, (n_train + n_test,), 0, n_classes)
    x = jnp.clip(protos[y] + noise * jax.random.normal(k_n, (n_train + n_test, n_in)), 0.0, 1.0)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def random_state(key, model, batch, dtype=jnp.float32, low=0.0, high=1.0):
    keys = jax.random.split(key, model.n_layers)
    return tuple(jax.random.uniform(k, (batch, n), dtype, low, high) for k, n in zip(keys, model.state_sizes))


def assert_trees_close(a, b, rtol=1e-6, atol=1e-9):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"tree structures differ: {ta} vs {tb}"
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def rel_err(a, b):
    """‖a − b‖ / ‖b‖ over all leaves of two pytrees seen as flat vectors."""
    a, b = (np.concatenate([np.ravel(np.asarray(l, np.float64)) for l in jax.tree.leaves(t)]) for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- an independent numpy implementation ------------------------------------------------
#
# Written from the equations (docs/equations.md, the model docstrings), sharing no code
# with the library: plain numpy, float64, dendritic maps as loops over (soma, branch) in
# the reference layout (branch (j, k) in column j·K + k).

NP_ACT = {
    "hard_sigmoid": lambda u: np.clip(u, 0.0, 1.0),
    "sigmoid": lambda u: 1.0 / (1.0 + np.exp(-u)),
    "tanh": np.tanh,
    "relu": lambda u: np.maximum(u, 0.0),
    "identity": lambda u: u,
}


def np_softmax(u):
    e = np.exp(u - u.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_loss(loss, s_out, y1h):
    """ℓ per example: ½‖s − ŷ‖² or −Σ ŷ log softmax(s)."""
    if loss == "mse":
        return 0.5 * np.sum((s_out - y1h) ** 2, -1)
    z = s_out - s_out.max(-1, keepdims=True)
    return -np.sum(y1h * (z - np.log(np.exp(z).sum(-1, keepdims=True))), -1)


def np_loss_grad(loss, s_out, y1h):
    return s_out - y1h if loss == "mse" else np_softmax(s_out) - y1h


def np_map(w, mask, c, u, K):
    """Dendritic map D(u)_j = (1/K) Σ_k ReLU((m_jk ⊙ w_jk)·u + c_jk), reference layout."""
    m, nK = w.shape
    out = np.zeros((u.shape[0], nK // K))
    for j in range(nK // K):
        for k in range(K):
            col = j * K + k
            z = u @ (mask[:, col] * w[:, col]) + (0.0 if c is None else c[col])
            out[:, j] += np.maximum(z, 0.0) / K
    return out


def np_map_grads(w, mask, c, u, K, coef):
    """Gradients of Σ_b coef_b · D(u_b) (coef `(B, n)`) with respect to w, c and u,
    one branch at a time: ∂/∂w_{i,jk} = Σ_b coef_bj/K · 1[z_bjk > 0] m_{i,jk} u_bi."""
    m, nK = w.shape
    dw, dc, du = np.zeros_like(w), np.zeros(nK), np.zeros_like(u)
    for j in range(nK // K):
        for k in range(K):
            col = j * K + k
            wk = mask[:, col] * w[:, col]
            z = u @ wk + (0.0 if c is None else c[col])
            a = (z > 0) * coef[:, j] / K  # (B,)
            dw[:, col] = mask[:, col] * (u.T @ a)
            dc[col] = a.sum()
            du += np.outer(a, wk)
    return dw, (dc if c is not None else None), du


def to_ref_index(n, K):
    """Column permutation taking the last axis from branch-major to the reference layout,
    read off `dendrites.to_reference_layout` applied to column numbers (exact integers, so
    float64 arrays are permuted in numpy without a float32 round trip)."""
    return np.asarray(ep_jax.dendrites.to_reference_layout(jnp.arange(n * K), n, K))


def from_ref_index(n, K):
    """The inverse permutation (`dendrites.from_reference_layout`)."""
    return np.asarray(ep_jax.dendrites.from_reference_layout(jnp.arange(n * K), n, K))


class NumpyNet:
    """Either model, from the library's params and buffers (copied into numpy, dendritic
    ones converted to the reference layout), with its own relaxation and gradients.

    Gradients are returned in the library's params structure and layout (`to_lib`)."""

    def __init__(self, model, params, buffers):
        self.model, self.kind = model, model.name
        self.L = model.n_layers
        self.act_h = NP_ACT[model.activation]
        self.act_o = NP_ACT[model.out_activation_name]
        self.loss = model.loss
        f = lambda a: np.asarray(a, np.float64)
        if self.kind == "ep":
            self.W = [f(p["w"]) for p in params]
            self.b = [f(p["b"]) for p in params]
            self.gamma = float(buffers["gamma"])
        else:
            Kb, Ka = model.basal_branches, model.apical_branches
            self.Kb, self.Ka = Kb, Ka
            ref = lambda a, n, K: f(a)[..., to_ref_index(n, K)]
            ns = model.sizes
            masks = buffers["masks"]
            self.basal = [
                (ref(p["w"], ns[l + 1], Kb), ref(m, ns[l + 1], Kb), ref(p["c"], ns[l + 1], Kb))
                for l, (p, m) in enumerate(zip(params["basal"], masks["basal"]))
            ]
            self.apical = [
                (ref(p["w"], ns[l + 1], Ka), ref(m, ns[l + 1], Ka))
                for l, (p, m) in enumerate(zip(params["apical"], masks["apical"]))
            ]
            self.alpha = float(buffers["alpha"])

    # --- dynamics ------------------------------------------------------------------------
    def ff(self, x, s):
        """Feedforward drive of every layer from its lower neighbour."""
        prev = [x] + list(s[:-1])
        if self.kind == "ep":
            return [prev[l] @ self.W[l] + self.b[l] for l in range(self.L)]
        return [np_map(w, m, c, prev[l], self.Kb) for l, (w, m, c) in enumerate(self.basal)]

    def drives(self, x, s, force):
        """h_l; `force` `(B, n_L)` is added to the output drive (None: free)."""
        h = self.ff(x, s)
        for l in range(self.L - 1):
            if self.kind == "ep":
                h[l] = h[l] + self.gamma * s[l + 1] @ self.W[l + 1].T
            else:
                w, m = self.apical[l]
                h[l] = h[l] + self.alpha * np_map(w, m, None, s[l + 1], self.Ka)
        if force is not None:
            h[-1] = h[-1] + force
        return h

    def relax(self, x, s, steps, dt, force_fn=None):
        """`steps` synchronous updates s_l ← (1 − dt_l) s_l + dt_l σ_l(h_l);
        force_fn(s_L) gives the output force (None: free phase)."""
        dts = [np.asarray(d, np.float64) for d in (dt if isinstance(dt, (list, tuple)) else [dt] * self.L)]
        s = [np.array(sl, np.float64) for sl in s]
        for _ in range(steps):
            h = self.drives(x, s, None if force_fn is None else force_fn(s[-1]))
            acts = [self.act_h] * (self.L - 1) + [self.act_o]
            s = [(1 - d) * sl + d * a(hl) for sl, hl, d, a in zip(s, h, dts, acts)]
        return s

    def free(self, x, steps, dt=1.0):
        x = np.asarray(x, np.float64)
        zero = [np.zeros((x.shape[0], n)) for n in self.model.state_sizes]
        return self.relax(x, zero, steps, dt)

    def nudged(self, x, s_free, y1h, beta, steps, dt=1.0):
        """Nudged phase with the force −β ∂ℓ/∂s_L (MSE or CE)."""
        return self.relax(
            np.asarray(x, np.float64), s_free, steps, dt, lambda sL: -beta * np_loss_grad(self.loss, sL, y1h)
        )

    def nudged_linear(self, x, s_free, g, beta, steps, dt=1.0):
        """Nudged phase with the fixed force −β g (the linear cost ⟨g, s_L⟩)."""
        return self.relax(np.asarray(x, np.float64), s_free, steps, dt, lambda sL: -beta * g)

    # --- parameter gradients of the batch-mean primitive, states fixed ---------------------
    def phi_grads(self, x, s):
        """(∂_θ Φ(s), ∂_x Φ(s)) with Φ = (1/B) Σ_l s_l · h_l-part-owned-by-layer-l (the
        output term −βℓ does not depend on θ)."""
        x = np.asarray(x, np.float64)
        B = x.shape[0]
        prev = [x] + list(s[:-1])
        if self.kind == "ep":
            g = [{"w": prev[l].T @ s[l] / B, "b": s[l].sum(0) / B} for l in range(self.L)]
            return g, s[0] @ self.W[0].T / B
        basal, apical, dx = [], [], None
        for l, (w, m, c) in enumerate(self.basal):
            dw, dc, du = np_map_grads(w, m, c, prev[l], self.Kb, s[l])
            basal.append({"w": dw / B, "c": dc / B})
            if l == 0:
                dx = du / B
        for l, (w, m) in enumerate(self.apical):
            dw, _, _ = np_map_grads(w, m, None, s[l + 1], self.Ka, self.alpha * s[l])
            apical.append({"w": dw / B})
        return {"basal": basal, "apical": apical}, dx

    def chl_grads(self, x, s_plus, s_free, beta):
        """g_W_l = −(1/β)⟨s⁺_{l−1} ⊗ (s⁺_l − s⁰_l)⟩, g_b_l = −(1/β)⟨s⁺_l − s⁰_l⟩ (EP model);
        for the dendritic model the basal map's gradient of the same contrast, apical zero."""
        x = np.asarray(x, np.float64)
        B = x.shape[0]
        prev = [x] + list(s_plus[:-1])
        d = [p - f for p, f in zip(s_plus, s_free)]
        if self.kind == "ep":
            return [
                {"w": -np.einsum("bi,bj->ij", prev[l], d[l]) / (beta * B), "b": -d[l].mean(0) / beta}
                for l in range(self.L)
            ]
        basal = []
        for l, (w, m, c) in enumerate(self.basal):
            dw, dc, _ = np_map_grads(w, m, c, prev[l], self.Kb, d[l])
            basal.append({"w": -dw / (beta * B), "c": -dc / (beta * B)})
        apical = [{"w": np.zeros_like(w)} for w, _ in self.apical]
        return {"basal": basal, "apical": apical}

    def estimate(self, kind, x, y, beta, t_free, t_nudge, dt=1.0):
        """(grads in the library's structure and layout, s_free, loss) of an EP estimator."""
        y1h = np.eye(self.model.n_classes)[np.asarray(y)]
        s0 = self.free(x, t_free, dt)
        sp = self.nudged(x, s0, y1h, beta, t_nudge, dt)
        if kind == "symmetric":
            sm = self.nudged(x, s0, y1h, -beta, t_nudge, dt)
            g = combine(-0.5 / beta, self.phi_grads(x, sp)[0], 0.5 / beta, self.phi_grads(x, sm)[0])
        elif kind == "one_sided":
            g = combine(-1 / beta, self.phi_grads(x, sp)[0], 1 / beta, self.phi_grads(x, s0)[0])
        elif kind == "chl":
            g = self.chl_grads(x, sp, s0, beta)
        else:
            raise ValueError(kind)
        return self.to_lib(g), s0, float(np.mean(np_loss(self.loss, s0[-1], y1h)))

    def to_lib(self, g):
        """Numpy gradients in the library's params structure (dendritic: branch-major)."""
        if self.kind == "ep":
            return tuple({"w": l["w"], "b": l["b"]} for l in g)
        ns = self.model.sizes
        bm = lambda a, n, K: a[..., from_ref_index(n, K)]
        return {
            "basal": tuple(
                {"w": bm(p["w"], ns[l + 1], self.Kb), "c": bm(p["c"], ns[l + 1], self.Kb)}
                for l, p in enumerate(g["basal"])
            ),
            "apical": tuple({"w": bm(p["w"], ns[l + 1], self.Ka)} for l, p in enumerate(g["apical"])),
        }


def combine(a, ga, b, gb):
    """a·ga + b·gb leaf by leaf (plain nested lists/dicts of numpy arrays)."""
    if isinstance(ga, dict):
        return {k: combine(a, ga[k], b, gb[k]) for k in ga}
    if isinstance(ga, (list, tuple)):
        return [combine(a, u, b, v) for u, v in zip(ga, gb)]
    return a * ga + b * gb


# --- the slow mark for long end-to-end runs ------------------------------------------------
#
# Tests that each take more than ~8 s on 2 CPU cores (measured with --durations, 2026-12-01)
# and repeat a path that faster tests also cover (whole command lines, subprocesses, the
# float64 twin of a float32 check). They run with `-m slow`, which CI runs after the default
# run; the default run stays near 10 minutes.
SLOW = {
    "test_alignment_tracking.py::test_sweep_members_each_measure_their_own_alignment_for_every_estimator",
    "test_alignment_tracking.py::test_measuring_does_not_perturb_training",
    "test_alignment_tracking.py::test_gdu_command_draws_the_figure",
    "test_docs.py::test_readme_main_job_as_written",
    "test_experiments.py::test_train_sweep_member_and_plain_loop_agree[float64]",
    "test_experiments.py::test_hidden_states_writes_under_runs_by_default",
    "test_experiments.py::test_reproduce_table2_smoke_end_to_end_and_rerun_trains_nothing",
    "test_experiments.py::test_sweep_member_order_does_not_matter",
    "test_experiments.py::test_diverging_member_frozen_others_continue",
    "test_interrupt.py::test_signal_leaves_interrupted_summary_and_resume_equals_uninterrupted",
    "test_interrupt.py::test_kill_9_mid_epoch_then_resume_equals_uninterrupted",
    "test_engine_parts.py::test_two_commands_into_one_folder_second_refused_first_untouched",
    "test_engine_parts.py::test_resume_after_the_data_moved",
    "test_sweep.py::test_sweep_folders_resume_and_refusals",
    "test_embed.py::test_flax_wrapper_trains_in_user_loop_and_serialises",
    "test_cli_errors.py::test_disk_full_mid_run_keeps_last_checkpoint_and_resumes",
    "test_conv_models.py::test_two_devices_data_parallel_equals_one_device",
    "test_conv_models.py::test_sweep_members_equal_solo_steps",
    "test_conv_models.py::test_symmetric_ep_equals_grad_through_relaxation[softmax]",
    "test_conv_models.py::test_every_estimator_gives_finite_grads_with_the_params_structure[dendritic_conv-softmax]",
    "test_conv_models.py::test_every_estimator_gives_finite_grads_with_the_params_structure[dendritic_conv]",
    "test_conv_models.py::test_every_estimator_gives_finite_grads_with_the_params_structure[conv-softmax]",
    "test_kernels.py::test_free_and_nudged_states_match_xla[False-dendritic-2h]",
    "test_kernels.py::test_free_and_nudged_states_match_xla[True-dendritic-2h]",
    "test_kernels.py::test_vmapped_members_equal_solo",
    "test_kernels.py::test_float64_matches_xla[dendritic]",
    "test_lease.py::test_dry_run_then_import",
    # > 12 s each on 2 cores (2026-12-02), their paths also covered by faster tests
    "test_parallel.py::test_eight_devices_equal_one_device",
    "test_parallel.py::test_eight_devices_sweep_equals_one_device_sweep",
    "test_experiments.py::test_train_sweep_member_and_plain_loop_agree[float32]",
    "test_distributed.py::test_two_processes_form_one_job",
    "test_conv_engine.py::test_augment_changes_training_not_evaluation_and_resumes_bit_exact",
    "test_conv_engine.py::test_augmented_sweep_steps_on_a_mesh_equal_one_device",
    "test_conv_engine.py::test_engine_mesh_runtime_augments_as_the_local_one",
    "test_holomorphic.py::test_gradient_error_command_writes_its_figure_and_numbers",
    "test_holomorphic.py::test_engine_runs_the_holomorphic_estimator_and_logs_residuals",
    "test_alignment_tracking.py::test_measure_equals_an_independent_comparison",
    "test_estimators.py::JitVariantsTest::test_train_step_against_independent_expectation__without_jit",
    "test_estimators.py::JitVariantsTest::test_train_step_against_independent_expectation__with_jit",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        file = item.nodeid.split("/")[-1]
        base = file.split("[")[0]
        if file in SLOW or base in SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop jax's compiled programs and traces: the default run
    compiles thousands of programs in one process, and holding them all made XLA:CPU's
    compiler crash (a segfault in backend_compile) late in a full run on 2 cores. Modules
    rarely share a program, so this costs few recompilations."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
