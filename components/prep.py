"""prep: build the sharded Parquet dataset the rest of the pipeline reads (`lgff prep ...`)."""
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def prep(source: str, config_yaml: str, dataset: Output[Dataset]) -> NamedTuple("Outputs", [("uri", str),
                                                                                            ("fingerprint", str)]):
    """``source``: ``samples:NAME`` (a real sample set from the installed packages, `lgff prep samples --sets NAME`)
    or ``imagefolder:DIR`` (one sub-folder per class, optionally under train/ val/ test/; `lgff prep imagefolder`).
    An existing dataset URI is not prepped: the pipeline scans it instead. The shards go to the bulk prefix, the
    artifact holds the pointer manifest; ``uri`` / ``fingerprint`` are what the downstream tasks read by."""
    from collections import namedtuple

    from lgff_core import storage
    from lgff_core.kfp.runtime import bulk_uri, dataset_facts, object_uri, publish_pointer, run_cli, write_config

    bulk = bulk_uri(dataset)
    common = ["--no-progress", "--config", write_config(config_yaml)]
    kind, _, arg = source.partition(":")
    if kind == "samples":
        run_cli(["prep", "samples", "--sets", arg, "--out", bulk, *common])  # one sub-prefix per set
        data_bulk = storage.join(bulk, arg)
    elif kind == "imagefolder":
        run_cli(["prep", "imagefolder", "--src", arg, "--out", bulk, *common])
        data_bulk = bulk
    else:
        raise ValueError(f"prep source {source!r}: expected samples:NAME or imagefolder:DIR "
                         "(an existing dataset URI is scanned, not prepped)")
    facts = dataset_facts(publish_pointer(dataset, data_bulk, "_manifest.json"))
    dataset.metadata.update(facts)
    dataset.metadata["source"] = source
    return namedtuple("Outputs", ["uri", "fingerprint"])(object_uri(dataset), facts["digest"])
