"""LRA data: ListOps vs independent evaluators, Pathfinder vs BFS, loaders on files written here."""

import collections
import math
import statistics

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from attd import lra
from attd.lra import listops as lo
from attd.lra import pathfinder as pf
from attd.lra import text as lt
from metattt.data import text_corpora as tc

# ----------------------------------------------------------------------------- ListOps


def _apply(op, args):
    if op == "[MAX":
        return max(args)
    if op == "[MIN":
        return min(args)
    if op == "[MED":
        return math.floor(statistics.median(args))
    assert op == "[SM"
    return sum(args) % 10


def _eval_prefix(tokens, i=0):
    """Recursive descent over the prefix tokens (parentheses removed)."""
    tok = tokens[i]
    if tok.isdigit():
        return int(tok), i + 1
    args, i = [], i + 1
    while tokens[i] != "]":
        value, i = _eval_prefix(tokens, i)
        args.append(value)
    return _apply(tok, args), i + 1


def _eval_binary(source):
    """LRA's own reading: '( a b )' pairs, an operator absorbing arguments until ']'."""
    tokens = source.split()

    def node(i):
        if tokens[i] != "(":
            tok = tokens[i]
            return (int(tok) if tok.isdigit() else tok), i + 1
        left, i = node(i + 1)
        right, i = node(i)
        assert tokens[i] == ")"
        if isinstance(left, str):  # operator + first argument: a partial application
            return (left, [right]), i + 1
        if right == "]":
            return _apply(left[0], left[1]), i + 1
        return (left[0], left[1] + [right]), i + 1

    value, end = node(0)
    assert end == len(tokens) and isinstance(value, int)
    return value


def _nesting(tokens):
    depth = best = 0
    for t in tokens:
        depth += t.startswith("[")
        depth -= t == "]"
        best = max(best, depth)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_listops_labels_match_two_independent_evaluators(seed):
    data = lo.generate_listops(
        40, seed=seed, max_depth=3 + seed % 3, max_args=5, min_length=5, max_length=150
    )
    for source, label, depth, length in zip(
        data.sources, data.labels, data.depth, data.length, strict=True
    ):
        tokens = [t for t in source.split() if t not in "()"]
        value, end = _eval_prefix(tokens)
        assert end == len(tokens)
        assert value == label == _eval_binary(source)
        assert _nesting(tokens) == depth and len(tokens) == length


def test_listops_lra_string_format_and_vocabulary():
    tree = ("[MAX", (2, 9))
    assert lo.to_source(tree) == "( ( ( [MAX 2 ) 9 ) ] )"
    assert lo.parse("( ( ( [MAX 2 ) 9 ) ] )") == tree == lo.parse("[MAX 2 9 ]")
    assert lo.evaluate(("[MED", (1, 2, 5, 9))) == 3 and lo.evaluate(("[SM", (7, 8))) == 5
    tokens, mask = lo.encode_listops(["( ( ( [MAX 2 ) 9 ) ] )"], 6)
    assert [lo.VOCAB[i] for i in tokens[0]] == ["[MAX", "2", "9", "]", "<pad>", "<pad>"]
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0])
    for bad in ("[MAX 2 ] ]", "[MAX ]", "[MAX 2", "[POW 2 ]", "3 4"):
        with pytest.raises(ValueError, match="source"):
            lo.parse(bad)


def test_listops_ranges_shift_determinism_and_padding():
    train = lo.generate_listops(
        150, seed=0, max_depth=4, max_args=6, min_length=10, max_length=120, seq_len=64
    )
    assert train.depth.min() >= 1 and train.depth.max() <= 4
    assert train.length.min() >= 10 and train.length.max() <= 120
    assert train.tokens.shape == (150, 64) and len(set(train.sources)) == 150
    np.testing.assert_array_equal(train.mask.sum(1), np.minimum(train.length, 64))
    test = lo.generate_listops(30, seed=1, min_depth=5, max_depth=6, max_args=4, max_length=300)
    assert set(np.unique(test.depth)) <= {5, 6}
    again = lo.generate_listops(
        150, seed=0, max_depth=4, max_args=6, min_length=10, max_length=120, seq_len=64
    )
    assert again.sources == train.sources
    np.testing.assert_array_equal(again.tokens, train.tokens)
    with pytest.raises(ValueError, match="min_depth"):
        lo.generate_listops(5, min_depth=3, max_depth=2)
    with pytest.raises(ValueError, match="max_tries"):
        lo.generate_listops(5, max_depth=1, max_args=2, min_length=9, max_length=9, max_tries=50)


def test_listops_tsv_round_trip(tmp_path):
    data = lo.generate_listops(25, seed=5, max_depth=3, max_args=4, max_length=60)
    path = tmp_path / "basic_test.tsv"
    lo.save_listops_tsv(path, data.sources, data.labels)
    assert path.read_text().splitlines()[0] == "Source\tTarget"
    loaded = lo.load_listops_tsv(path, seq_len=60)
    assert loaded.sources == data.sources
    for a, b in zip(loaded[:-1], data[:-1], strict=True):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "bad.tsv").write_text("Input\tLabel\n[MAX 1 2 ]\t2\n")
    with pytest.raises(ValueError, match="header"):
        lo.load_listops_tsv(tmp_path / "bad.tsv")


# --------------------------------------------------------------------------- Pathfinder


def _bfs_connected(image, a, b):
    """8-connected search over the non-zero pixels, from pixel a to pixel b."""
    h, w = image.shape
    seen = {tuple(a)}
    queue = collections.deque([tuple(a)])
    while queue:
        r, c = queue.popleft()
        if (r, c) == tuple(b):
            return True
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                q = (r + dr, c + dc)
                if 0 <= q[0] < h and 0 <= q[1] < w and q not in seen and image[q] > 0:
                    seen.add(q)
                    queue.append(q)
    return False


@pytest.fixture(scope="module")
def pathfinder_data():
    return pf.generate_pathfinder(
        200, seed=0, size=(24, 24), path_length=(8, 14), num_distractors=(0, 3),
        distractor_length=4,
    )  # fmt: skip


def test_pathfinder_labels_match_bfs_and_classes_balance(pathfinder_data):
    data = pathfinder_data
    assert abs(data.labels.mean() - 0.5) <= 0.05
    for image, label, (a, b) in zip(data.images, data.labels, data.markers, strict=True):
        assert image[tuple(a)] == 255 and image[tuple(b)] == 255
        assert np.hypot(*(a - b)) >= 5.0
        assert _bfs_connected(image, a, b) == bool(label)


def test_pathfinder_paths_never_touch_and_difficulty_ranges(pathfinder_data):
    data = pathfinder_data
    assert data.path_length.min() >= 8 and data.path_length.max() <= 14
    assert set(np.unique(data.num_distractors)) <= {0, 1, 2, 3}
    # Every path is its own 8-connected component: 2 main paths plus the distractors.
    for image, count in zip(data.images[:60], data.num_distractors[:60], strict=True):
        _, components = ndimage.label(image > 0, structure=np.ones((3, 3)))
        assert components == 2 + count


def test_pathfinder_thick_dashed_determinism_and_sequences():
    kwargs = dict(seed=3, size=(32, 32), path_length=12, num_distractors=2, thickness=2)
    solid = pf.generate_pathfinder(21, **kwargs)
    assert solid.labels.sum() == 11  # 21 // 2 = 10 negatives
    for image, label, (a, b) in zip(solid.images, solid.labels, solid.markers, strict=True):
        assert _bfs_connected(image, a, b) == bool(label)
    again = pf.generate_pathfinder(21, **kwargs)
    np.testing.assert_array_equal(again.images, solid.images)
    dashed = pf.generate_pathfinder(21, dashed=True, dash=(2, 2), **kwargs)
    np.testing.assert_array_equal(dashed.labels, solid.labels)
    assert np.all(dashed.images <= solid.images) and dashed.images.sum() < solid.images.sum()
    seq = pf.to_sequences(solid.images)
    assert seq.shape == (21, 1024) and seq.dtype == np.int32
    np.testing.assert_array_equal(seq.reshape(21, 32, 32), solid.images)
    np.testing.assert_array_equal(pf.to_sequences(solid.images / 255.0), seq)
    with pytest.raises(ValueError, match="clearance"):
        pf.generate_pathfinder(2, clearance=1)
    with pytest.raises(ValueError, match="num_distractors"):
        pf.generate_pathfinder(2, size=(8, 8), path_length=6, num_distractors=20,
                               max_image_tries=3)  # fmt: skip


def test_pathfinder_official_layout_round_trip(tmp_path):
    data = pf.generate_pathfinder(12, seed=1, size=(16, 16), path_length=6, num_distractors=1)
    root = tmp_path / "pathfinder16" / "curv_baseline"
    extra = np.stack([data.path_length, data.num_distractors], 1)
    pf.save_pathfinder(root, data.images, data.labels, extra=extra, per_folder=1)
    assert len(list((root / "metadata").glob("*.npy"))) == 12  # 10.npy must follow 9.npy
    first = (root / "metadata" / "0.npy").read_text().split()
    assert first[:4] == ["imgs/0", "sample_0.png", "0", str(data.labels[0])]
    with Image.open(root / "imgs" / "3" / "sample_3.png") as img:
        assert img.mode == "L" and img.size == (16, 16)
    loaded = pf.load_pathfinder(root)
    np.testing.assert_array_equal(loaded.images, data.images)
    np.testing.assert_array_equal(loaded.labels, data.labels)
    (root / "imgs" / "5" / "sample_5.png").write_bytes(b"")  # LRA skips empty images
    loaded = pf.load_pathfinder(root)
    assert len(loaded.labels) == 11 and all(p.name != "sample_5.png" for p in loaded.paths)
    with pytest.raises(ValueError, match="root"):
        pf.load_pathfinder(tmp_path)


# --------------------------------------------------------------------------------- Text


def test_aclimdb_loader_reads_the_folder_layout(tmp_path):
    reviews = {
        ("train", "pos", "0_9.txt"): "A gem. Ünïcode too.",
        ("train", "pos", "1_7.txt"): "Good.",
        ("train", "neg", "2_1.txt"): "Dull " * 10,
        ("train", "unsup", "3_0.txt"): "ignored",
        ("test", "pos", "4_8.txt"): "Fine.",
        ("test", "neg", "5_3.txt"): "Bad.",
    }
    for parts, text in reviews.items():
        path = tmp_path.joinpath("aclImdb", *parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    train = lt.load_aclimdb(tmp_path / "aclImdb", "train", seq_len=16)
    np.testing.assert_array_equal(train.labels, [0, 1, 1])
    np.testing.assert_array_equal(train.rating, [1, 9, 7])
    assert train.tokens.shape == (3, 16)
    texts = tc.decode_tokens(train.tokens)
    assert texts[0] == b"Dull Dull Dull D" and train.length[0] == 50
    assert texts[1] == "A gem. Ünïcode t".encode()[:16]
    assert texts[2] == b"Good." and train.mask[2].sum() == 5
    test = lt.load_aclimdb(tmp_path / "aclImdb", "test", seq_len=8)
    np.testing.assert_array_equal(test.labels, [0, 1])
    with pytest.raises(ValueError, match="split"):
        lt.load_aclimdb(tmp_path / "aclImdb", "unsup")
    with pytest.raises(ValueError, match="root"):
        lt.load_aclimdb(tmp_path, "train")


def test_stdlib_text_task_splits_by_file_with_a_length_shift():
    splits, manifest = lt.stdlib_text_task(seq_len=64, test_length=128, max_per_class=30)
    assert splits["train"].tokens.shape[1] == 64 and splits["test"].tokens.shape[1] == 128
    assert splits["test"].length.max() == 128
    train_files = set(manifest.splits["train"].names)
    assert set(splits["train"].names) <= train_files
    assert set(splits["test"].names) <= set(manifest.splits["test"].names)
    assert not set(splits["test"].names) & train_files
    for split in splits.values():
        counts = np.bincount(split.labels)
        assert counts.size == 2 and counts[0] == counts[1] > 0  # balanced by default


# -------------------------------------------------------------------------------- tasks

_LISTOPS = dict(min_depth=1, max_depth=2, min_length=5, max_length=40, seq_len=40)


def _listops_task(seed):
    train = dict(num=60, offset=0, **_LISTOPS)
    test_id = dict(num=20, offset=1000, **_LISTOPS)
    shift = dict(_LISTOPS, min_depth=3, max_depth=4, max_length=80, seq_len=80)
    return lra.listops_task(seed, train, test_id, dict(num=20, offset=2000, **shift))


def _sources(split):
    """The expressions of a split as strings rebuilt from its tokens."""
    rows = zip(split.tokens, split.mask, strict=True)
    return {" ".join(lo.VOCAB[t] for t in row[m]) for row, m in rows}


def test_data_seed_strides_seeds_apart():
    assert lra.data_seed(0, 1000) == 1000
    assert lra.data_seed(3, 7) == 3 * 10_007 + 7
    assert lra.data_seed(1, 0) != lra.data_seed(0, 1000)  # offsets stay below the stride


def test_listops_split_leaves_out_the_excluded_expressions():
    both = lo.generate_listops(30, seed=lra.data_seed(2, 5), **_LISTOPS)
    exclude = frozenset(both.sources[::3])  # every third expression of the same stream
    split, sources = lra.listops_split(20, 2, offset=5, exclude=exclude, **_LISTOPS)
    want = [i for i, s in enumerate(both.sources) if s not in exclude][:20]
    assert sources == {both.sources[i] for i in want} and not sources & exclude
    np.testing.assert_array_equal(split.tokens, both.tokens[want])
    np.testing.assert_array_equal(split.labels, both.labels[want])
    np.testing.assert_array_equal(split.difficulty, both.depth[want])


def test_listops_task_sizes_disjoint_splits_shift_and_determinism():
    task = _listops_task(0)
    assert (task.vocab_size, task.num_classes) == (len(lo.VOCAB), 10)
    sizes = [len(s.labels) for s in (task.train, task.test_id, task.test_shift)]
    assert sizes == [60, 20, 20] and task.test_shift.tokens.shape == (20, 80)
    train = _sources(task.train)
    assert len(train) == 60
    assert not train & _sources(task.test_id) and not train & _sources(task.test_shift)
    labels = [lo.evaluate(lo.parse(s)) for s in sorted(_sources(task.test_id))]
    assert sorted(labels) == sorted(task.test_id.labels.tolist())  # labels are the values
    assert task.test_shift.difficulty.min() == 3 and task.train.difficulty.max() <= 2
    again, other = _listops_task(0), _listops_task(1)
    for a, b in zip(jax.tree.leaves(task), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _sources(other.train) != train


def test_pathfinder_task_follows_its_seeds_and_recipe():
    split = dict(size=(16, 16), num_distractors=(0, 1), distractor_length=3)
    train = dict(num=16, offset=0, path_length=(5, 6), **split)
    shift = dict(num=8, offset=2000, path_length=(6, 7), **split)
    task = lra.pathfinder_task(3, train, dict(train, num=8, offset=1000), shift)
    assert (task.vocab_size, task.num_classes) == (256, 2)
    direct = pf.generate_pathfinder(
        8, seed=lra.data_seed(3, 2000), size=(16, 16), path_length=(6, 7),
        num_distractors=(0, 1), distractor_length=3,
    )  # fmt: skip
    np.testing.assert_array_equal(task.test_shift.tokens, pf.to_sequences(direct.images))
    np.testing.assert_array_equal(task.test_shift.difficulty, direct.path_length)
    assert task.test_shift.mask.all() and task.train.tokens.shape == (16, 256)
    assert not np.array_equal(task.train.tokens[:8], task.test_id.tokens)  # other offset


def test_text_task_subsamples_held_out_passages_per_seed():
    rng = np.random.default_rng(0)

    def byte_text(n, length):
        tokens = rng.integers(1, 257, (n, length)).astype(np.int32)
        lengths = rng.integers(length // 2, length + 1, n).astype(np.int32)
        mask = np.arange(length) < lengths[:, None]
        return lt.ByteText(tokens, mask, rng.integers(0, 2, n), lengths, [""] * n, -np.ones(n))

    splits = {"train": byte_text(10, 8), "val": byte_text(30, 8), "test": byte_text(30, 16)}
    task = lra.text_task(splits, 12, seed=4)
    assert (task.vocab_size, task.num_classes) == (257, 2)
    np.testing.assert_array_equal(task.train.tokens, splits["train"].tokens)
    for split, name, seed in ((task.test_id, "val", 4), (task.test_shift, "test", 5)):
        idx = np.sort(np.random.default_rng(seed).permutation(30)[:12])
        assert len(set(idx)) == 12
        np.testing.assert_array_equal(split.tokens, splits[name].tokens[idx])
        np.testing.assert_array_equal(split.difficulty, splits[name].length[idx])
    other = lra.text_task(splits, 12, seed=6)
    assert not np.array_equal(other.test_id.tokens, task.test_id.tokens)
