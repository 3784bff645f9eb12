"""The bidirectional node graph shared by LGFFN-E, LGFFN-D and BiFPN (DESIGN.md section 2).

One layer maps the four levels P1_0..P4_0 (strides 4, 8, 16, 32; all C channels) to P1_2..P4_2:

    P3_1 = node(T_g(P3_0),          T_l(up(P4_0)))
    P2_1 = node(T_g(P2_0),          T_l(up(P3_1)))
    P1_2 = node(T_g(P1_0),          T_l(up(P2_1)))
    P2_2 = node(T_l(P2_0), T_l(P2_1), T_g(down(P1_2)))
    P3_2 = node(T_l(P3_0), T_l(P3_1), T_g(down(P2_2)))
    P4_2 = node(T_l(P4_0),            T_g(down(P3_2)))

The graph is data (`NODE_GRAPH`); a neck only supplies the parts: the per-edge transform of each kind
(LGFFN-E: GA / LA aggregators; LGFFN-D: FMBConvCA with global / local channel attention; BiFPN: identity), the
resamplers, how a node combines its inputs (fast normalized fusion or a plain sum) and what follows (BiFPN:
separable conv + BN + SiLU). Every edge owns its own modules. `PyramidNeck` stacks L layers: the outputs of one
layer are the next layer's inputs.

Shape contract: a list of 4 tensors (B, C, H/s, W/s) for s = 4, 8, 16, 32 -> the same shapes. H and W must be
divisible by 32 (each level exactly half the size of the previous one).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

__all__ = ["NODE_GRAPH", "INPUT_NODES", "OUTPUT_NODES", "PyramidNode", "PyramidLayer", "PyramidNeck", "SumFusion"]

INPUT_NODES = ("p1_0", "p2_0", "p3_0", "p4_0")
OUTPUT_NODES = ("p1_2", "p2_2", "p3_2", "p4_2")
# (node, ((source node, resample "up" / "down" / None, transform kind "global" / "local"), ...)), in evaluation order
NODE_GRAPH: tuple[tuple[str, tuple[tuple[str, Optional[str], str], ...]], ...] = (
    ("p3_1", (("p3_0", None, "global"), ("p4_0", "up", "local"))),
    ("p2_1", (("p2_0", None, "global"), ("p3_1", "up", "local"))),
    ("p1_2", (("p1_0", None, "global"), ("p2_1", "up", "local"))),
    ("p2_2", (("p2_0", None, "local"), ("p2_1", None, "local"), ("p1_2", "down", "global"))),
    ("p3_2", (("p3_0", None, "local"), ("p3_1", None, "local"), ("p2_2", "down", "global"))),
    ("p4_2", (("p4_0", None, "local"), ("p3_2", "down", "global"))),
)

ModuleFactory = Callable[[int], nn.Module]


class SumFusion(nn.Module):
    """Direct sum of the inputs (LGFFN-D nodes)."""

    def __init__(self, num_inputs: int) -> None:
        super().__init__()
        self.num_inputs = num_inputs

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        out = inputs[0]
        for x in inputs[1:]:
            out = out + x
        return out


class PyramidNode(nn.Module):
    """``post(combine([edge_i(x_i) for each input]))`` where ``edge_i = transform_i(resample_i(x_i))``."""

    def __init__(self, edges: list[nn.Module], combine: nn.Module, post: nn.Module) -> None:
        super().__init__()
        self.edges = nn.ModuleList(edges)
        self.combine = combine
        self.post = post

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.post(self.combine([edge(x) for edge, x in zip(self.edges, inputs)]))


class PyramidLayer(nn.Module):
    def __init__(
        self,
        channels: int,
        make_transform: Callable[[str, int], nn.Module],
        make_up: ModuleFactory,
        make_down: ModuleFactory,
        make_combine: Callable[[int], nn.Module],
        make_post: ModuleFactory,
    ) -> None:
        super().__init__()
        resamplers = {None: lambda c: nn.Identity(), "up": make_up, "down": make_down}
        nodes = {}
        for name, edges in NODE_GRAPH:
            parts = [nn.Sequential(resamplers[resample](channels), make_transform(kind, channels))
                     for _, resample, kind in edges]
            nodes[name] = PyramidNode(parts, make_combine(len(edges)), make_post(channels))
        self.nodes = nn.ModuleDict(nodes)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        values = dict(zip(INPUT_NODES, features))
        for name, edges in NODE_GRAPH:
            values[name] = self.nodes[name]([values[src] for src, _, _ in edges])
        return [values[name] for name in OUTPUT_NODES]


class PyramidNeck(nn.Module):
    """L stacked `PyramidLayer`s; subclasses build ``self.layers`` and set ``channels``."""

    channels: int
    layers: nn.ModuleList

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(INPUT_NODES):
            raise ValueError(f"{type(self).__name__} expects {len(INPUT_NODES)} levels, got {len(features)}")
        for fine, coarse in zip(features[:-1], features[1:]):
            if fine.shape[-2] != 2 * coarse.shape[-2] or fine.shape[-1] != 2 * coarse.shape[-1]:
                sizes = ", ".join("x".join(map(str, f.shape[-2:])) for f in features)
                raise ValueError(f"feature levels must halve exactly (input sides divisible by 32); got {sizes}")
        out = list(features)
        for layer in self.layers:
            out = layer(out)
        return out
