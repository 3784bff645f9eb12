"""prep: build the sharded Parquet dataset the rest of the pipeline reads (`lgff prep ...`)."""
from kfp import dsl
from kfp.dsl import Dataset, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def prep(source: str, config_yaml: str, dataset: Output[Dataset]):
    """``source``: ``samples:NAME`` (a real sample set from the installed packages, `lgff prep samples --sets NAME`)
    or ``imagefolder:DIR`` (one sub-folder per class, optionally under train/ val/ test/; `lgff prep imagefolder`).
    An existing dataset URI is not prepped: the pipeline imports it instead."""
    import os
    import shutil

    from lgff_core.pipeline_runtime import dataset_facts, run_cli, write_config

    out = dataset.path  # built locally, uploaded by the launcher on a cluster
    common = ["--no-progress", "--config", write_config(config_yaml)]
    kind, _, arg = source.partition(":")
    if kind == "samples":
        # `prep samples` writes one sub-prefix per set; build into a staging dir and move the set into place
        staging = out + ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        run_cli(["prep", "samples", "--sets", arg, "--out", staging, *common])
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(os.path.join(staging, arg), out)
        shutil.rmtree(staging)
    elif kind == "imagefolder":
        run_cli(["prep", "imagefolder", "--src", arg, "--out", out, *common])
    else:
        raise ValueError(f"prep source {source!r}: expected samples:NAME or imagefolder:DIR "
                         "(an existing dataset URI is imported, not prepped)")
    dataset.metadata.update(dataset_facts(out))
    dataset.metadata["source"] = source
