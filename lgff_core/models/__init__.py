"""LGFF model zoo: frozen timm backbone, stem, aggregators, GRN, fusion, necks (LGFFN-E, LGFFN-D, BiFPN), GeM head,
Sub-center ArcFace, Mask R-CNN detection model and the factories (`build_model`, `build_baseline`, `build_loss`).

One concept per module; see each module's docstring for the paper formula and the shape contract.
"""
from .aggregators import GlobalAggregator, LocalAggregator
from .backbone import FrozenBackbone, map_state_dict_in_order, package_weights_path, read_state_dict, select_out_indices
from .bifpn import BiFPN
from .detection import LGFFDetectionModel, NeckBackbone
from .embedding import GeMBaselineModel, LGFFEmbeddingModel
from .fusion import FastNormalizedFusion
from .gem import GeM
from .grn import GlobalResponseNorm
from .heads import GeMHead, GeMMiniHead
from .lgffn_detection import FMBConvCA, LGFFND
from .lgffn_embedding import LGFFNE
from .pyramid import NODE_GRAPH, PyramidNeck
from .registry import NECKS, build_backbone, build_baseline, build_loss, build_model, build_neck, register_neck
from .stem import Stem
from .subcenter_arcface import SubCenterArcFace

__all__ = [
    "FrozenBackbone", "select_out_indices", "package_weights_path", "read_state_dict", "map_state_dict_in_order",
    "Stem", "GlobalResponseNorm", "LocalAggregator", "GlobalAggregator", "FastNormalizedFusion",
    "NODE_GRAPH", "PyramidNeck", "LGFFNE", "LGFFND", "FMBConvCA", "BiFPN",
    "GeM", "GeMHead", "GeMMiniHead", "LGFFEmbeddingModel", "GeMBaselineModel",
    "NeckBackbone", "LGFFDetectionModel", "SubCenterArcFace",
    "NECKS", "register_neck", "build_neck", "build_backbone", "build_model", "build_baseline", "build_loss",
]
