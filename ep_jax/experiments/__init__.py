"""The experiment layer: configs, the engine that trains runs and sweeps into run
folders, and the commands (`ep-jax train|sweep|reproduce|...`, or `python -m
ep_jax.experiments.<command>`; from a checkout also `python -m experiments.<command>`).

The core library (`ep_jax.*` outside this package) never imports it.
"""
