"""Pallas GPU kernels beside pure-jnp references (selective scan, MoE expert dispatch).

This package imports only jax: nothing of metattt or attd. The kernels land with their issues.
"""
