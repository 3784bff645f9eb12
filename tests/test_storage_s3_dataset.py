"""The same conversion to s3:// (moto server over HTTP, standard AWS env vars) gives byte-identical shards to the
local one, and every reader works against the object store."""
import hashlib

from lgff_core import storage
from lgff_core.cli import main
from lgff_core.data import iter_row_range, read_manifest, read_table, verify_dataset
from lgff_core.data.convert import ConvertOptions
from lgff_core.data.converters.coco import convert_coco
from lgff_core.data.converters.folders import convert_kimia
from lgff_core.data.dataset import ShardedImageDataset
from lgff_core.data.testing import make_coco_tree, make_kimia_tree

from s3_server import s3_env  # noqa: F401  (session fixture)


def test_kimia_to_s3_is_byte_identical_to_local(tmp_path, s3_env, capsys):
    src = make_kimia_tree(tmp_path / "kimia", scans=(0, 2), train_per_scan=4, test_per_scan=2, size=64)
    local = convert_kimia(src, str(tmp_path / "local"), ConvertOptions(shard_mb=0.01))
    uri = s3_env.new_prefix("kimia")
    code = main(["-q", "prep", "kimia", "--src", str(src), "--out", uri, "--shard-mb", "0.01", "--no-progress"])
    assert code == 0
    remote = read_manifest(uri)
    assert remote.num_shards == local.num_shards > 1
    for info in remote.shards:
        data = storage.read_bytes(storage.join(uri, info.name))
        assert data == (tmp_path / "local" / info.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.sha256
    assert storage.list_files(uri)[-1].endswith("part-%05d.parquet" % (remote.num_shards - 1))
    assert verify_dataset(uri) == []
    assert main(["data", "verify", uri]) == 0
    # readers over S3
    ids = read_table(uri, columns=["sample_id"]).column("sample_id").to_pylist()
    assert ids == read_table(str(tmp_path / "local"), columns=["sample_id"]).column("sample_id").to_pylist()
    got = [x for _, b in iter_row_range(uri, 3, 9, columns=["sample_id"]) for x in b.column("sample_id").to_pylist()]
    assert got == ids[3:9]
    ds = ShardedImageDataset(uri, split="test")
    rows = list(ds)
    assert len(rows) == len(ds) == 4 and all(r["image"].size == (64, 64) for r in rows)
    # a rerun against the same prefix is a no-op, another dataset is refused
    assert main(["-q", "prep", "kimia", "--src", str(src), "--out", uri, "--shard-mb", "0.01", "--no-progress"]) == 0
    capsys.readouterr()
    other = make_kimia_tree(tmp_path / "other", scans=(1,), train_per_scan=1, test_per_scan=1)
    assert main(["-q", "prep", "kimia", "--src", str(other), "--out", uri, "--no-progress"]) == 2
    assert "already holds a different dataset" in capsys.readouterr().err


def test_coco_to_s3_and_stale_parts_are_cleaned(tmp_path, s3_env):
    images_dir, ann_file = make_coco_tree(tmp_path / "coco", n_images=4)
    local = convert_coco(images_dir, ann_file, str(tmp_path / "local"), ConvertOptions(shard_mb=0.005))
    uri = s3_env.new_prefix("coco")
    storage.write_bytes(storage.join(uri, "part-00007.parquet"), b"left by a killed run")
    remote = convert_coco(images_dir, ann_file, uri, ConvertOptions(shard_mb=0.005))
    assert [s.sha256 for s in remote.shards] == [s.sha256 for s in local.shards]
    assert not storage.exists(storage.join(uri, "part-00007.parquet"))
    anns = read_table(uri, columns=["annotations"]).column("annotations").to_pylist()
    assert sum(len(a) for a in anns) == 9
