"""Memory-mapped inverted lists whose resident pages stay bounded while a stage streams through them.

faiss maps on-disk inverted lists (`OnDiskInvertedLists`, and IVF files read with ``IO_FLAG_MMAP``) into the
process. Every page a merge or a search touches then stays mapped until the index is closed, so the kernel's RSS of
a stage that reads the whole archive grows with the archive even though none of it is anonymous memory. The stages
therefore work in rounds and hand the touched pages back after each round (``madvise(MADV_DONTNEED)``): the bytes
stay in the page cache, so a later touch is a minor fault, and the process keeps at most one round's pages.

`RESIDENT_BYTES` is the size of a round: list bytes a merge reads, or about what a batch of queries probes.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
from typing import Optional

import faiss

logger = logging.getLogger(__name__)

RESIDENT_BYTES = int(os.environ.get("LGFF_RESIDENT_MB", "64")) << 20

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def mapped_lists(index_or_lists) -> Optional["faiss.OnDiskInvertedLists"]:
    """The memory-mapped inverted lists of an IVF index (or of an InvertedLists), None when they are in RAM."""
    invlists = index_or_lists
    if isinstance(index_or_lists, faiss.Index):
        try:
            invlists = faiss.extract_index_ivf(index_or_lists).invlists
        except RuntimeError:  # not an IVF index
            return None
    invlists = faiss.downcast_InvertedLists(invlists)
    if isinstance(invlists, faiss.OnDiskInvertedLists) and invlists.ptr is not None and invlists.totsize:
        return invlists
    return None


def release(invlists: Optional["faiss.OnDiskInvertedLists"]) -> None:
    """Unmap the resident pages of mapped lists from this process (contents kept: the mapping is shared and
    file-backed, so dirty pages stay in the page cache). A no-op for lists in RAM or where madvise is missing."""
    if invlists is None or _MADV_DONTNEED is None:
        return
    start = int(invlists.ptr)
    aligned = start - start % mmap.PAGESIZE
    length = start + int(invlists.totsize) - aligned
    if _madvise()(aligned, length, _MADV_DONTNEED) != 0:
        logger.debug("madvise(MADV_DONTNEED) failed: %s", os.strerror(ctypes.get_errno()))


def queries_per_round(index: faiss.Index, nprobe: Optional[int] = None) -> Optional[int]:
    """How many queries a search round may hold so that the lists they probe fit in `RESIDENT_BYTES` (None: the
    index has no mapped lists, search in one call)."""
    invlists = mapped_lists(index)
    if invlists is None:
        return None
    ivf = faiss.extract_index_ivf(index)
    probes = max(1, min(int(nprobe or ivf.nprobe), int(ivf.nlist)))
    list_bytes = max(1, int(invlists.totsize) // max(1, int(ivf.nlist)))
    return max(1, RESIDENT_BYTES // (probes * list_bytes))
