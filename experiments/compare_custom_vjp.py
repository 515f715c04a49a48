"""Comparison cell: the EP layer's custom-VJP gradient against the direct symmetric EP
estimate and against `jax.grad` BPTT through the same block (float64).

    python -m experiments.compare_custom_vjp [--beta 0.01] [--activation sigmoid]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import ep_jax
from ep_jax import checks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--activation", default="sigmoid")
    p.add_argument("--kind", default="ep")
    a = p.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    m = ep_jax.build_model(a.kind, sizes=(20, 16, 12, 5), activation=a.activation)
    h = ep_jax.make_hyper(m, beta=a.beta)
    params, buffers = m.init(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 20), jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 5)
    block = ep_jax.make_ep_block(m, 200, 20)
    g_vjp = jax.grad(lambda p: jnp.mean(m.cost(block(p, buffers, x, h), m.one_hot(y, jnp.float64))))(params)
    g_ep, _ = ep_jax.estimate(ep_jax.Estimator("symmetric", 200, 20), m, params, buffers, x, y, h)
    g_bptt, _ = ep_jax.estimate(ep_jax.Estimator("bptt_full", 200, 20), m, params, buffers, x, y, h)
    print(checks.format_comparison(checks.compare(g_vjp, g_ep), "custom VJP vs direct symmetric EP estimate"))
    print()
    print(checks.format_comparison(checks.compare(g_vjp, g_bptt), "custom VJP vs BPTT through all 200 free steps"))


if __name__ == "__main__":
    main()
