"""Recordings, stacked tasks and sampled task batches of generated sessions, against slicing
loops over the generator's own sessions."""

import jax
import numpy as np
import pytest

from metattt.data import SessionConfig, WindowBatch, generate_sessions
from metattt.data import session_tasks as ST
from metattt.meta import Task

CFG = SessionConfig(num_steps=96, min_neurons=5, max_neurons=7, units_per_region=16)
C, P, STRIDE, N_MAX = 6, 2, 4, 9


def _windows_loop(row_data, starts):
    """(context, target) of the windows starting at ``starts``, one slice at a time."""
    ctx = np.stack([row_data[:, s : s + C] for s in starts])
    tgt = np.stack([row_data[:, s + C : s + C + P] for s in starts])
    return ctx, tgt


def test_recordings_are_padded_sessions_with_global_ids_and_leak_free_tasks():
    first = 3
    recs = ST.make_recordings(
        CFG, 2, 5, max_neurons=N_MAX, context=C, horizon=P, stride=STRIDE, first_session_id=first
    )
    sessions = generate_sessions(2, 5, CFG, first_session_id=first)
    next_id = first * N_MAX  # held-out ids start after every earlier session's slots
    cut = CFG.num_steps // 2
    for i, (rec, ses) in enumerate(zip(recs, sessions, strict=True)):
        n = ses.data.shape[0]
        assert rec.session_id == first + i
        np.testing.assert_array_equal(rec.data[:n], ses.data)
        assert not rec.data[n:].any() and rec.data.shape == (N_MAX, CFG.num_steps)
        assert rec.mask.tolist() == [True] * n + [False] * (N_MAX - n)
        assert rec.unit_ids[:n].tolist() == list(range(next_id, next_id + n))
        assert not rec.unit_ids[n:].any()
        next_id += n
        support_starts = list(range(0, cut - C - P + 1, STRIDE))
        query_starts = list(range(cut, CFG.num_steps - C - P + 1, STRIDE))
        for batch, starts in ((rec.task.support, support_starts), (rec.task.query, query_starts)):
            ctx, tgt = _windows_loop(rec.data, starts)
            assert batch.start.tolist() == starts
            np.testing.assert_array_equal(batch.context, ctx)
            np.testing.assert_array_equal(batch.target, tgt)
            assert (batch.session_id == first + i).all()
            np.testing.assert_array_equal(
                batch.unit_ids, np.broadcast_to(rec.unit_ids, (len(starts), N_MAX))
            )
            np.testing.assert_array_equal(
                batch.mask, np.broadcast_to(rec.mask, (len(starts), N_MAX))
            )
        assert max(support_starts) + C + P <= cut <= min(query_starts)  # no shared time step


def test_held_out_recordings_share_no_unit_id_with_training_ones():
    kw = dict(max_neurons=N_MAX, context=C, horizon=P, stride=STRIDE)
    train = ST.make_recordings(CFG, 3, 1, **kw)
    test = ST.make_recordings(CFG, 2, 1, first_session_id=3, **kw)

    def ids(recs):
        return {int(u) for r in recs for u in r.unit_ids[r.mask]}

    assert ids(train).isdisjoint(ids(test)) and len(ids(train)) == sum(r.mask.sum() for r in train)
    assert [r.session_id for r in train + test] == [0, 1, 2, 3, 4]


def _random_batch(rng, w, n=4):
    return WindowBatch(
        context=rng.normal(size=(w, n, C)).astype(np.float32),
        target=rng.normal(size=(w, n, P)).astype(np.float32),
        mask=rng.random((w, n)) < 0.7,
        unit_ids=rng.integers(0, 50, (w, n)).astype(np.int32),
        session_id=rng.integers(0, 5, w).astype(np.int32),
        start=rng.integers(0, 90, w).astype(np.int32),
    )


def test_concat_windows_puts_batches_end_to_end():
    rng = np.random.default_rng(0)
    batches = [_random_batch(rng, w) for w in (3, 1, 4)]
    got = ST.concat_windows(batches)
    rows = [(b, i) for b in batches for i in range(b.context.shape[0])]
    assert got.context.shape[0] == len(rows) == 8
    for field in WindowBatch._fields:
        for k, (b, i) in enumerate(rows):
            np.testing.assert_array_equal(getattr(got, field)[k], getattr(b, field)[i])


def test_stack_tasks_adds_a_leading_session_axis():
    rng = np.random.default_rng(1)
    tasks = [Task(_random_batch(rng, 3), _random_batch(rng, 2)) for _ in range(4)]
    got = ST.stack_tasks(tasks)
    assert got.support.context.shape == (4, 3, 4, C) and got.query.start.shape == (4, 2)
    for s, task in enumerate(tasks):
        for a, b in zip(jax.tree.leaves(task), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(b[s], a)


def test_sample_tasks_draws_distinct_sessions_and_windows_of_the_source():
    recs = ST.make_recordings(CFG, 3, 2, max_neurons=N_MAX, context=C, horizon=P, stride=STRIDE)
    tasks = ST.stack_tasks([r.task for r in recs])
    key = jax.random.key(7)
    batch = ST.sample_tasks(key, tasks, 2, 3, 4)
    assert batch.support.context.shape == (2, 3, N_MAX, C)
    assert batch.query.target.shape == (2, 4, N_MAX, P)
    np.testing.assert_array_equal(batch.key, jax.random.key_data(jax.random.split(key, 2)))
    chosen = [int(batch.support.session_id[t, 0]) for t in range(2)]
    assert len(set(chosen)) == 2
    for t, sid in enumerate(chosen):
        for part, drawn in (("support", batch.support), ("query", batch.query)):
            source = getattr(recs[sid].task, part)
            starts = drawn.start[t].tolist()
            assert len(set(starts)) == len(starts)  # without replacement
            assert (drawn.session_id[t] == sid).all()
            for w, start in enumerate(starts):
                (row,) = np.flatnonzero(source.start == start)
                for field in WindowBatch._fields:
                    np.testing.assert_array_equal(
                        getattr(drawn, field)[t, w], getattr(source, field)[row]
                    )
    # A pure function of the key: the same key draws the same batch, other keys other batches.
    again = ST.sample_tasks(key, tasks, 2, 3, 4)
    for a, b in zip(jax.tree.leaves(batch), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    others = [
        ST.sample_tasks(jax.random.key(k), tasks, 2, 3, 4).support.start for k in range(8, 12)
    ]
    assert any(not np.array_equal(o, batch.support.start) for o in others)


def test_make_recordings_rejects_a_too_small_padding():
    with pytest.raises(ValueError, match="max_neurons"):
        ST.make_recordings(CFG, 2, 0, max_neurons=3, context=C, horizon=P, stride=STRIDE)
