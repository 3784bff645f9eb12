"""kfp v2 components: one per pipeline stage, each a thin typed wrapper around one `lgff` command.

Every component runs ``lgff_core.cli.main([...])`` (via `lgff_core.kfp.runtime.run_cli`), the same code path
as the shell, in the project image (`LGFF_IMAGE`; the pipeline may override it per task from
``pipeline.image``). Nothing is pip-installed at run time: ``install_kfp_package=False`` and no
``packages_to_install``; the image already holds kfp and lgff_core. Datasets, embeddings and indexes are pointer
artifacts (their manifest; the bulk data lives under ``<pipeline_root>/.bulk/``, `lgff_core.kfp.runtime`);
sources imported by URI and the plan's work blocks are parameters, so cache keys follow content; small facts (row
counts, digests, metrics) go to ``.metadata``.
"""
from ._image import LGFF_IMAGE
from .embed import collect_embeddings, embed
from .evaluate import evaluate
from .evaluate_detection import evaluate_detection
from .explain import explain
from .index import index_add, index_append, index_build, index_merge, index_train
from .plan import plan, scan
from .prep import prep
from .report import report
from .train import train

__all__ = [
    "LGFF_IMAGE",
    "prep",
    "scan",
    "plan",
    "train",
    "embed",
    "collect_embeddings",
    "index_build",
    "index_train",
    "index_add",
    "index_append",
    "index_merge",
    "evaluate",
    "evaluate_detection",
    "explain",
    "report",
]
