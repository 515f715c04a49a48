"""Training-set augmentation on the device: random crop and horizontal flip.

As Laborieux et al. 2021's CIFAR-10 code (`main.py` of Laborieux-Axel/Equilibrium-Propagation:
`RandomHorizontalFlip(0.5)`, `RandomCrop(32, padding=4, padding_mode='edge')`): each image
is padded by `pad` pixels on every side, repeating its border pixels (`padding="edge"`;
`"zero"` pads with zeros instead), a window of the original size is cut at an offset drawn
uniformly from `{0, ..., 2·pad}²`, and the window is mirrored left-right with probability ½.
The images are the flat, normalised rows `(B, H·W·C)` in row-major HWC order; padding,
cropping and flipping commute with the per-channel normalisation, so augmenting normalised
rows gives what the reference gets by augmenting pixels first.

Randomness: example `j` of the dataset at training step `t` of a member uses the key
`fold_in(fold_in(base, t), j)` with `base` the member's augmentation key (the experiment
engine: `fold_in(data_key, AUG_TAG)`, `ep_jax.experiments.build.augment_key`). A draw
depends only on (member, step, example), not on the batch layout or the device that
holds the example, so a resumed run and a data-parallel run see the same crops.
Evaluation never augments.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

#: folded into a member's data key to make its augmentation key (no epoch number is this large)
AUG_TAG = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class CropFlip:
    """Random crop with `pad`-pixel padding and random horizontal flip (module docstring);
    hashable, so it can be a static argument of a jitted step.

    shape: `(H, W, C)` of the flat rows; pad: pixels added on each side (0: no crop);
    flip: mirror left-right with probability ½; padding: "edge" (the reference's) or "zero"."""

    shape: tuple
    pad: int = 4
    flip: bool = True
    padding: str = "edge"

    def __post_init__(self):
        shape = tuple(int(d) for d in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be three positive integers (H, W, C), got {self.shape}")
        if int(self.pad) < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")
        if self.padding not in ("edge", "zero"):
            raise ValueError(f"padding must be 'edge' or 'zero', got {self.padding!r}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "pad", int(self.pad))

    def one(self, key, row):
        """One flat image `(H·W·C,)` augmented with `key`."""
        H, W, C = self.shape
        p = self.pad
        img = row.reshape(H, W, C)
        k_crop, k_flip = jax.random.split(key)
        if p:
            mode = "edge" if self.padding == "edge" else "constant"
            padded = jnp.pad(img, ((p, p), (p, p), (0, 0)), mode=mode)
            dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * p + 1)
            img = jax.lax.dynamic_slice(padded, (dy, dx, jnp.zeros((), dy.dtype)), (H, W, C))
        if self.flip:
            img = jnp.where(jax.random.bernoulli(k_flip), img[:, ::-1], img)
        return img.reshape(row.shape)

    def __call__(self, key, x, ix):
        """x: `(B, H·W·C)` rows of the examples `ix: (B,)` (their dataset indices); key:
        this step's key (`fold_in(base, step)`). Returns the augmented `(B, H·W·C)`."""
        if x.shape[-1] != self.shape[0] * self.shape[1] * self.shape[2]:
            raise ValueError(
                f"x has {x.shape[-1]} features per example, the images {self.shape} "
                f"need {self.shape[0] * self.shape[1] * self.shape[2]}"
            )
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ix)
        return jax.vmap(self.one)(keys, x)


def step_key(base, step):
    """The augmentation key of training step `step`: `fold_in(base, step)`."""
    return jax.random.fold_in(base, step)
