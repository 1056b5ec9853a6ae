"""A training step spread over a device mesh: the batch sharded, and optionally the state too.

:func:`shard_step` wraps any :class:`metattt.train.Step` (``supervised``, the meta-step, ATTD's
outer step) so that each call shards the batch's leading axis over one mesh axis (data
parallelism: every device computes the loss of its share, XLA's partitioner reduces the
gradient). With ``shard_params`` the parameters and the optimizer state are sharded as well,
FSDP-style (ZeRO-3): each array is split along its largest dimension that the axis size divides
(:func:`param_shardings`), so a device holds about 1/n of the state, and the partitioner gathers
a weight where a computation needs it whole. Either way the result is the single-device step's
up to float reassociation in the reductions, and :func:`metattt.train.fit` runs the wrapped step
unchanged (checkpoints restore into the template's sharding).

The mesh's axes are made automatic (``AxisType.Auto``): explicit axes would put the sharding into
every traced type inside an inner loop, which ``vmap`` of ``lax.scan`` rejects.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from metattt.train import Step

__all__ = [
    "data_mesh",
    "leaf_spec",
    "local_copy",
    "param_shardings",
    "shard_stacked",
    "shard_step",
]

PyTree = Any


def leaf_spec(shape: tuple[int, ...], axis: str, size: int, min_size: int = 1024) -> PartitionSpec:
    """Where one state array lives: split along its largest dimension that ``size`` divides
    (the first of equal ones), or replicated when it has fewer than ``min_size`` entries or
    no such dimension (scalars, step counts, odd-sized biases)."""
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    candidates = [d for d in range(len(shape)) if shape[d] % size == 0]
    if not candidates:
        return PartitionSpec()
    dim = max(candidates, key=lambda d: (shape[d], -d))
    return PartitionSpec(*(axis if d == dim else None for d in range(len(shape))))


def local_copy(tree: PyTree) -> PyTree:
    """Each array of ``tree``, replicated over a mesh (possibly spanning several processes), as
    an array of this process only (on its default device, uncommitted): what a step trained on
    the mesh hands to code that then runs the same computation on every process alone."""
    return jax.device_put(jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree))


def data_mesh(num_devices: int, axis: str = "batch") -> Mesh | None:
    """A one-axis data-parallel mesh over ``num_devices`` devices (all processes'), or None for
    0. Its axis is ``Auto``: shardings follow from placement, as :func:`shard_step` uses them."""
    if not num_devices:
        return None
    return jax.make_mesh((num_devices,), (axis,), axis_types=(AxisType.Auto,))


def shard_stacked(tree: PyTree, mesh: Mesh, axis: str | None = None) -> PyTree:
    """Host-made stacked batches (every leaf ``(steps, batch, ...)``, what
    :func:`metattt.train.fit` scans with ``stacked=True``) placed with their batch axis split over
    mesh axis ``axis`` (default: the mesh's first); every process passes the same global
    arrays."""
    spec = PartitionSpec(None, axis or mesh.axis_names[0])
    return jax.device_put(tree, NamedSharding(_auto(mesh), spec))


def _auto(mesh: Mesh) -> Mesh:
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)


def param_shardings(
    tree: PyTree, mesh: Mesh, axis: str | None = None, *, min_size: int = 1024
) -> PyTree:
    """A :class:`NamedSharding` per array of ``tree`` by :func:`leaf_spec` over mesh axis
    ``axis`` (default: the mesh's first); works on arrays and on traced values alike."""
    axis = axis or mesh.axis_names[0]
    mesh, size = _auto(mesh), mesh.shape[axis]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), axis, size, min_size)), tree
    )


def shard_step(
    step: Step,
    mesh: Mesh | None,
    *,
    axis: str | None = None,
    shard_params: bool = False,
    min_size: int = 1024,
) -> Step:
    """``step`` with its batch sharded over ``mesh`` axis ``axis`` and, with ``shard_params``,
    its state sharded by :func:`param_shardings` (otherwise replicated).

    Args:
      step: a :class:`metattt.train.Step` whose ``update(state, batch)`` treats the leading
        axis of every batch leaf as independent examples or tasks.
      mesh: the device mesh; None (what :func:`data_mesh` gives for no mesh) returns ``step``
        unchanged.
      axis: the mesh axis to shard over (default: the mesh's first).
      shard_params: shard parameters and optimizer state (FSDP) instead of replicating them.
      min_size: arrays with fewer entries stay replicated (gathering them costs more than it
        saves).

    Returns:
      A :class:`metattt.train.Step`. Its ``update`` raises a one-line ValueError when the
      batch's leading axis is not one size divisible by the axis's device count.
    """
    if mesh is None:
        return step
    axis = axis or mesh.axis_names[0]
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
    mesh, num_shards = _auto(mesh), mesh.shape[axis]
    replicated = NamedSharding(mesh, PartitionSpec())
    by_example = NamedSharding(mesh, PartitionSpec(axis))

    def placement(state: PyTree) -> PyTree:
        if shard_params:
            return param_shardings(state, mesh, axis, min_size=min_size)
        return jax.tree.map(lambda _: replicated, state)

    @jax.jit
    def constrained(state, batch):
        state, metrics = step.update(state, batch)
        state = jax.lax.with_sharding_constraint(state, placement(state))
        everywhere = jax.tree.map(lambda _: replicated, metrics)
        return state, jax.lax.with_sharding_constraint(metrics, everywhere)

    def init(*args, **kwargs):
        state = step.init(*args, **kwargs)
        return jax.device_put(state, placement(state))

    def update(state, batch):
        sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
        if len(sizes) != 1 or None in sizes or next(iter(sizes)) % num_shards:
            raise ValueError(
                f"the batch's leading axis ({sorted(sizes, key=str)}) must be one size divisible "
                f"by the {num_shards} devices of mesh axis {axis!r}"
            )
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(batch)):
            # Inside a trace (fit's compiled multi-step call) device_put places nothing: the
            # batch made there is split by a constraint instead.
            batch = jax.lax.with_sharding_constraint(batch, by_example)
        else:
            batch = jax.device_put(batch, by_example)
        return constrained(jax.device_put(state, placement(state)), batch)

    return Step(init, update)
