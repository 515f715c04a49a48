"""Comparison cell: the EP layer's custom-VJP gradient against the direct symmetric EP
estimate and against `jax.grad` BPTT through the same block (float64).

    python -m experiments.compare_custom_vjp [--beta 0.01] [--activation sigmoid] [--kind ep]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

import ep_jax
from ep_jax import alignment
from ep_jax.experiments import cli


def main(argv=None):
    """The command: parse `argv` and run it."""
    p = argparse.ArgumentParser(
        prog=cli.prog("compare_custom_vjp"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--activation", default="sigmoid")
    p.add_argument("--kind", default="ep", choices=("ep", "dendritic"))
    cli.add_common(p)
    a = p.parse_args(argv)
    with jax.enable_x64(True):
        m = ep_jax.build_model(a.kind, sizes=(20, 16, 12, 5), activation=a.activation)
        rx = ep_jax.make_relaxation(m, beta=a.beta)
        params, buffers = m.init(jax.random.PRNGKey(0), jnp.float64)
        x = jax.random.normal(jax.random.PRNGKey(1), (32, 20), jnp.float64)
        y = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 5)
        est = ep_jax.Estimator("symmetric", 200, 20)
        block = ep_jax.make_ep_block(m, est)
        g_vjp = jax.grad(lambda p: jnp.mean(m.cost(block(p, buffers, x, rx), m.one_hot(y, jnp.float64))))(params)
        g_ep, _ = ep_jax.estimate(m, est, None, params, buffers, x, y, rx)
        g_bptt, _ = ep_jax.estimate(m, ep_jax.Estimator("bptt_full", 200, 20), None, params, buffers, x, y, rx)
        print(alignment.format_comparison(alignment.compare(g_vjp, g_ep), "custom VJP vs direct symmetric EP estimate"))
        print()
        print(
            alignment.format_comparison(
                alignment.compare(g_vjp, g_bptt), "custom VJP vs BPTT through all 200 free steps"
            )
        )


if __name__ == "__main__":
    sys.exit(cli.main_wrapper(main))
