"""Search-time parameters of a faiss index (nprobe, efSearch, k_factor_rf), set by name where the index has them.

Its own module because both the in-RAM core and the versioned store (which restores a recorded nprobe on load)
use it, and the store sits below the core."""
from __future__ import annotations

import logging
from typing import Optional

import faiss

logger = logging.getLogger(__name__)


def set_search_params(index: faiss.Index, nprobe: Optional[int] = None, ef_search: Optional[int] = None,
                      k_factor_rf: Optional[float] = None) -> None:
    """Set search-time parameters where the index has them (silently skipped otherwise)."""
    ps = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search), ("k_factor_rf", k_factor_rf)):
        if value is None:
            continue
        try:
            ps.set_index_parameter(index, name, value)
        except RuntimeError:
            logger.debug("index has no parameter %s", name)
