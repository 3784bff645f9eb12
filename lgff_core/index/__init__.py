"""faiss index for retrieval: in-RAM core (`core`), versioned verified storage (`store`), archive-scale on-disk IVF
(`ondisk`) and the CLI / kfp stages (`stages`). Everything public is importable from ``lgff_core.index``."""
from .core import (add_shard, build_index, faiss_metric, merge_shards, new_index, prepare_vectors, read_neighbours,
                   search, search_neighbours, search_neighbours_batched, set_search_params, train_index,
                   write_neighbours, _sample_rows, _is_pure_ivf)
from .ondisk import check_fits_in_ram, suggest_ivf, EmbeddingsSource
from .stages import (PARTIAL_META, add_from_embeddings, append_to_index, build_from_embeddings, merge_partials,
                     read_id_list, remove_from_index, search_to_parquet, shard_range, train_from_embeddings)
from .store import (IDMAP_FILE, INDEX_FILE, IVFDATA_FILE, META_FILE, TRAINED_FILE, IdMap, IndexBundle, idmap_table,
                    load_index, read_manifest, save_index)

__all__ = [
    "INDEX_FILE", "IDMAP_FILE", "IVFDATA_FILE", "META_FILE", "TRAINED_FILE", "PARTIAL_META",
    "faiss_metric", "prepare_vectors", "new_index", "train_index", "build_index", "add_shard", "merge_shards",
    "set_search_params", "search", "IndexBundle", "IdMap", "idmap_table", "save_index", "load_index", "read_manifest",
    "search_neighbours", "search_neighbours_batched", "write_neighbours", "read_neighbours", "shard_range",
    "build_from_embeddings", "train_from_embeddings", "add_from_embeddings", "merge_partials", "append_to_index",
    "remove_from_index", "read_id_list", "search_to_parquet", "check_fits_in_ram", "suggest_ivf", "EmbeddingsSource",
]
