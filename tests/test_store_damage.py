"""Prediction stores: a corrupt chunk or manifest names the store and the chunk, a chunk from another store is
refused, non-finite probabilities are refused (cdkit.infer.store)."""
import json

import numpy as np
import pytest


# --- stores: named errors, checksums, finite values -----------------------------------------------

def small_store(path, n=6, seed=0, chunk_rows=3):
    from cdkit.infer.store import StoreWriter
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(5), size=n)
    with StoreWriter(path, n_classes=5, k=2, chunk_rows=chunk_rows) as w:
        for a in range(0, n, chunk_rows):
            w.add(np.arange(a, a + chunk_rows) + 100 * seed, np.zeros(chunk_rows), p[a:a + chunk_rows])
    return path


def test_corrupt_store_chunk_or_manifest_names_store_and_chunk(tmp_path):
    from cdkit.infer.store import StoreError, load_store
    store = small_store(tmp_path / "a.store")
    chunk = store / "chunk_00001.npz"
    data = chunk.read_bytes()
    chunk.write_bytes(data[:len(data) // 2])
    with pytest.raises(StoreError, match=f"{store}: chunk chunk_00001.npz"):
        load_store(store)
    manifest = json.loads((store / "manifest.json").read_text())
    for c in manifest["chunks"]: del c["sha256"]  # a store of an older version: no checksums
    del manifest["sha256"]
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=f"{store}: chunk chunk_00001.npz is unreadable \\(BadZipFile"):
        load_store(store)
    (store / "manifest.json").write_text('{"format": "cdkit-predstore", "vers')
    with pytest.raises(StoreError, match=f"{store / 'manifest.json'} is corrupt"):
        load_store(store)


def test_chunk_from_another_store_is_refused(tmp_path):
    from cdkit.infer.store import StoreError, load_store
    a, b = small_store(tmp_path / "a.store", seed=0), small_store(tmp_path / "b.store", seed=1)
    (a / "chunk_00001.npz").write_bytes((b / "chunk_00001.npz").read_bytes())
    with pytest.raises(StoreError, match="chunk_00001.npz does not match the checksum"):
        load_store(a)
    manifest = json.loads((a / "manifest.json").read_text())
    for c in manifest["chunks"]: del c["sha256"]
    del manifest["sha256"]  # an older version's manifest has no checksum of its own either
    (a / "manifest.json").write_text(json.dumps(manifest))
    assert load_store(a).product_id.tolist() == [0, 1, 2, 103, 104, 105]  # old stores: loaded unchecked


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_probabilities_are_refused(tmp_path, bad):
    import torch

    from cdkit.infer.store import StoreError, StoreWriter
    p = np.full((4, 1, 5), 0.2)
    p[2, 0, 3] = bad
    with StoreWriter(tmp_path / "s.store", n_classes=5, k=2) as w:
        for probs in (p, torch.tensor(p)):
            with pytest.raises(StoreError, match=f"{tmp_path / 's.store'}: probabilities .* row 2 \\(product_id 12\\)"):
                w.add(np.arange(10, 14), np.zeros(4), probs)
        with pytest.raises(StoreError, match="rest .* row 1 \\(product_id 11\\)"):
            w.add_topk(np.arange(10, 14), np.zeros(4), np.zeros((4, 1, 2)), np.full((4, 1, 2), 0.3),
                       np.array([[0.4], [bad], [0.4], [0.4]]))
        w.add(np.arange(10, 14), np.zeros(4), np.full((4, 1, 5), 0.2))
    from cdkit.infer.store import load_store
    assert len(load_store(tmp_path / "s.store")) == 4
