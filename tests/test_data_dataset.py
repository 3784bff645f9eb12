"""Readers: ShardedImageDataset (workers x ranks partition, shuffle determinism, split filter) and block readers."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lgff_core.data import iter_record_batches, iter_row_range, read_manifest, read_table, row_subset, shard_subset
from lgff_core.data import dataset as dataset_mod
from lgff_core.data.dataset import ShardedImageDataset
from lgff_core.data.testing import make_tiny_dataset
from lgff_core.errors import DataError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_dataset(str(root / "ds"), per_class=6, shard_mb=0.01)  # 3 classes x 6 x 3 splits = 54 rows


def test_manifest_and_subsets(tiny):
    m = read_manifest(tiny)
    assert m.num_rows == 54 and m.num_shards >= 3 and m.label_names == ["a", "b", "c"]
    assert m.split_counts == {"test": 18, "train": 18, "val": 18}
    assert sum(sum(s.split_counts.values()) for s in m.shards) == 54
    parts = [shard_subset(10, i, 3) for i in range(3)]
    assert [list(p) for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [row_subset(7, i, 2) for i in range(2)] == [(0, 3), (3, 7)]
    with pytest.raises(ValueError):
        shard_subset(3, 3, 3)


def test_row_range_reader_matches_full_table(tiny):
    m = read_manifest(tiny)
    ids = read_table(tiny, columns=["sample_id"]).column("sample_id").to_pylist()
    got = []
    for i in range(3):
        start, stop = row_subset(m.num_rows, i, 3)
        pos_seen = start
        for pos, batch in iter_row_range(tiny, start, stop, columns=["sample_id"], batch_size=4):
            assert pos == pos_seen
            pos_seen += batch.num_rows
            got += batch.column("sample_id").to_pylist()
        assert pos_seen == stop
    assert got == ids
    streamed = [x for b in iter_record_batches(tiny, columns=["sample_id"], batch_size=5) for x in
                b.column("sample_id").to_pylist()]
    assert streamed == ids
    assert read_table(tiny, columns=["label"], shards=[1]).num_rows == m.shards[1].num_rows


def test_missing_manifest_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a dataset"):
        read_manifest(str(tmp_path))


def test_each_row_once_across_ranks_and_workers(tiny, monkeypatch):
    seen = []
    for cid in range(4):  # 2 ranks x 2 workers
        monkeypatch.setattr(dataset_mod, "consumer_info", lambda cid=cid: (cid, 4))
        ds = ShardedImageDataset(tiny, shuffle=True, shuffle_buffer=4, seed=3, decode=False)
        ds.set_epoch(1)
        seen += [r["index"] for r in ds]
    assert sorted(seen) == list(range(54))


def test_shuffle_is_deterministic_per_seed_and_epoch(tiny):
    def order(seed, epoch):
        ds = ShardedImageDataset(tiny, shuffle=True, shuffle_buffer=8, seed=seed, decode=False)
        ds.set_epoch(epoch)
        return [r["sample_id"] for r in ds]

    a = order(0, 0)
    assert a == order(0, 0) and sorted(a) == sorted(order(0, 1))
    assert a != order(0, 1) and a != order(1, 0)
    plain = [r["sample_id"] for r in ShardedImageDataset(tiny, decode=False)]
    assert plain == sorted(plain)


def test_split_filter_transform_and_dataloader_workers(tiny):
    ids = read_table(tiny, columns=["sample_id", "split", "label"]).to_pylist()
    val_ids = sorted(r["sample_id"] for r in ids if r["split"] == "val")

    def to_tensor(img):
        return torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 255

    ds = ShardedImageDataset(tiny, split="val", transform=to_tensor)
    assert len(ds) == 18
    loader = DataLoader(ds, batch_size=5, num_workers=2)
    got, labels = [], {}
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 32, 32) and batch["image"].dtype == torch.float32
        got += batch["sample_id"]
        labels.update(zip(batch["sample_id"], batch["label"].tolist()))
    assert sorted(got) == val_ids
    assert all(labels[r["sample_id"]] == r["label"] for r in ids if r["split"] == "val")
