"""Adaptive Test-Time Dynamics (ATTD) on a Mamba SSM, built on the metattt core.

The model, dynamics adapter, ponder controller and Long Range Arena data land with their issue.
"""
