"""`python -m ep_jax.experiments <command>`: the `ep-jax` entry point."""

import sys

from ep_jax.experiments.commands import main

sys.exit(main())
