"""Pallas GPU kernels beside pure-jnp references (selective scan, MoE expert dispatch).

:mod:`kernels_pallas.selftest` decides when ``backend="auto"`` may run a kernel (an allow-list
of proven device kinds, then a one-time self-test against the ``jnp`` form, else the ``jnp``
form) and records what every call resolved to.

This package imports only jax: nothing of metattt or attd. The kernels land with their issues.
"""
