"""Text corpora from Python's own files: splits by document, hashes, determinism, byte tokens."""

import hashlib

import numpy as np
import pytest

from metattt.data import text_corpora as tc


@pytest.fixture(scope="module")
def corpus():
    return tc.build_corpus("doc_vs_code", length=256, seed=0, max_per_class=200)


def test_splits_are_disjoint_by_document_and_cover_every_document(corpus):
    class_names, names, labels = tc.list_documents("doc_vs_code")
    assert class_names == ("doc", "code")
    assert "stdlib/pydoc_data/topics.py" not in names  # the prose must not leak into "code"
    splits = corpus.manifest.splits
    seen = [set(splits[s].names) for s in tc.SPLITS]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert seen[0] | seen[1] | seen[2] == set(names)
    for s in tc.SPLITS:
        passages = getattr(corpus, s)
        assert set(np.unique(passages.labels)) == {0, 1}
        assert np.all(np.bincount(passages.labels) <= 200)
        # Every passage's document belongs to this split, with that document's label.
        assert passages.doc.max() < len(splits[s].names)
        np.testing.assert_array_equal(passages.labels, np.array(splits[s].labels)[passages.doc])


def test_manifest_records_version_and_verifiable_hashes(corpus):
    manifest = corpus.manifest
    assert manifest.python_version == tc.python_version()
    assert manifest.python_version.split()[-1].startswith("3.")
    split = manifest.splits["val"]
    for name, digest in zip(split.names, split.sha256, strict=True):
        assert hashlib.sha256(tc.read_document(name)).hexdigest() == digest
    assert tc.verify_manifest(manifest) == ()
    bad_val = split._replace(sha256=("0" * 64,) + split.sha256[1:])
    tampered = manifest._replace(splits={**manifest.splits, "val": bad_val})
    assert tc.verify_manifest(tampered) == (split.names[0],)
    again = tc.CorpusManifest.from_json(manifest.to_json())
    assert again == manifest


def test_build_is_deterministic_and_seed_dependent(corpus):
    same = tc.build_corpus("doc_vs_code", length=256, seed=0, max_per_class=200)
    for a, b in zip(corpus.train, same.train, strict=True):
        np.testing.assert_array_equal(a, b)
    assert same.manifest == corpus.manifest
    other = tc.build_corpus("doc_vs_code", length=256, seed=1, max_per_class=200)
    assert other.manifest.splits["test"].names != corpus.manifest.splits["test"].names


def test_passages_are_the_document_bytes_at_their_offsets(corpus):
    names = corpus.manifest.splits["test"].names
    texts = tc.decode_tokens(corpus.test.tokens[:50])
    for text, d, off in zip(texts, corpus.test.doc[:50], corpus.test.offset[:50], strict=True):
        assert text == tc.read_document(names[d])[off : off + 256]
        assert len(text) >= 64  # min_bytes = L // 4
    np.testing.assert_array_equal(corpus.test.mask, corpus.test.tokens != tc.PAD_ID)


def test_stdlib_packages_corpus_labels_files_by_package():
    data = tc.build_corpus(
        "stdlib_packages", length=128, seed=0, max_per_class=20, packages=("json", "email")
    )
    assert data.manifest.class_names == ("json", "email")
    for split in data.manifest.splits.values():
        for name, label in zip(split.names, split.labels, strict=True):
            assert name.startswith(f"stdlib/{('json', 'email')[label]}/")
            assert "/test/" not in name and "/tests/" not in name
    with pytest.raises(ValueError, match="packages"):
        tc.list_documents("stdlib_packages", packages=("json", "no_such_package"))
    with pytest.raises(ValueError, match="corpus"):
        tc.list_documents("novels")


def test_encode_decode_round_trip_truncation_and_mask():
    texts = ["héllo", b"\x00\xff raw", b""]
    tokens, mask, lengths = tc.encode_bytes(texts, 6)
    assert tokens.shape == (3, 6) and tokens.dtype == np.int32
    np.testing.assert_array_equal(lengths, [6, 6, 0])
    assert tc.decode_tokens(tokens) == ["héllo".encode(), b"\x00\xff raw", b""]
    np.testing.assert_array_equal(mask.sum(1), [6, 6, 0])
    assert tokens.max() < tc.VOCAB_SIZE and tokens[1, 0] == 1 and tokens[1, 1] == 256
    short, _, _ = tc.encode_bytes(["abcdefgh"], 3)
    assert tc.decode_tokens(short) == [b"abc"]
    with pytest.raises(ValueError, match="length"):
        tc.encode_bytes(["a"], 0)


def test_lm_windows_are_contiguous_next_byte_pairs(corpus):
    stream = tc.concat_documents(corpus.manifest.splits["val"].names[:3])
    batch = tc.lm_windows(stream, 32, num_windows=8, seed=0)
    assert batch.inputs.shape == batch.targets.shape == (8, 32)
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    for row, start in zip(batch.inputs, batch.start, strict=True):
        np.testing.assert_array_equal(row - 1, stream[start : start + 32])
    again = tc.lm_windows(stream, 32, num_windows=8, seed=0)
    np.testing.assert_array_equal(again.start, batch.start)
    ordered = tc.lm_windows(b"0123456789", 3)
    np.testing.assert_array_equal(ordered.start, [0, 3, 6])
    assert bytes((ordered.targets[-1] - 1).astype(np.uint8)) == b"789"
    with pytest.raises(ValueError, match="stream"):
        tc.lm_windows(b"abc", 3)


def test_split_documents_validates_and_stratifies():
    parts = tc.split_documents([0] * 10 + [1] * 5, (0.6, 0.2, 0.2), seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(15))
    assert all(len({0, 1} & {int(i >= 10) for i in p}) == 2 for p in parts)
    with pytest.raises(ValueError, match="fractions"):
        tc.split_documents([0, 1], (0.5, 0.6))
    with pytest.raises(ValueError, match="labels"):
        tc.split_documents([0, 0, 1], (0.4, 0.3, 0.3))
    with pytest.raises(ValueError, match="name"):
        tc.read_document("elsewhere/x.py")
