"""Example: an EP head on a small convolutional feature extractor, trained in a plain
user-written optax loop (the EP block's weights get EP gradients through its custom
VJP; the convolution gets ordinary gradients through the EP estimate of ∂C/∂x).

    python -m experiments.example_ep_head [--subset 6000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ep_jax.data import load_dataset, subset
from ep_jax.experiments import cli
from ep_jax.nn import EPBlock


class ConvEP(nn.Module):
    """A strided convolution and average pooling feeding a 392-128-10 EP network."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(-1, 28, 28, 1)
        x = nn.relu(nn.Conv(8, (5, 5), strides=(2, 2))(x))  # (B, 14, 14, 8)
        x = nn.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)  # (B, 392)
        return EPBlock(sizes=(392, 128, 10), kind="ep", activation="hard_sigmoid", t_free=30, t_nudge=8, beta=0.2)(
            jnp.clip(x, 0, 1)
        )


def main(argv=None):
    """The command: parse `argv` and run it."""
    p = argparse.ArgumentParser(
        prog=cli.prog("example_ep_head"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir")
    p.add_argument("--subset", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    cli.add_common(p)
    a = p.parse_args(argv)
    ds = subset(load_dataset(a.dataset, a.data_dir), a.subset, 2000, key=jax.random.PRNGKey(a.seed))
    net = ConvEP()
    variables = net.init(jax.random.PRNGKey(a.seed), ds.x_train[:2])
    params, buffers = variables["params"], variables["buffers"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss(pr):
            out = net.apply({"params": pr, "buffers": buffers}, x)
            return 0.5 * jnp.mean(jnp.sum((out - jax.nn.one_hot(y, 10)) ** 2, -1))

        l, g = jax.value_and_grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, l

    accuracy = jax.jit(lambda pr, x, y: jnp.mean(jnp.argmax(net.apply({"params": pr, "buffers": buffers}, x), -1) == y))
    rng = np.random.default_rng(a.seed)
    for epoch in range(1, a.epochs + 1):
        order = rng.permutation(len(ds.y_train))
        for i in range(0, len(order) - 63, 64):
            idx = order[i : i + 64]
            params, opt, l = step(params, opt, ds.x_train[idx], ds.y_train[idx])
        print(
            f"epoch {epoch}: loss {float(l):.4f}  test accuracy {100 * float(accuracy(params, ds.x_test, ds.y_test)):.2f}%"
        )


if __name__ == "__main__":
    sys.exit(cli.main_wrapper(main))
