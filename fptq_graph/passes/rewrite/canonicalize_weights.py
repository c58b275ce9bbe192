"""Give every quantizable linear its own constant [K, N] weight input (a float-exact rewrite).

Later passes then scale (LAE) and quantize `node.inputs[1]` directly, without caring whether the
weight came through a Transpose, Gemm's transB or alpha, or is shared with another node (tied
embeddings): the shared original stays for its other users.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fptq_graph.patterns.graph_match import constant_value, resolve_weight
from fptq_graph.passes.base import Pass, PassResult


class CanonicalizeWeights(Pass):
    name = "canonicalize_weights"
    kind = "rewrite"
    requires = frozenset({"linears"})
    ensures = frozenset({"canonical_weights"})

    def run(self, state) -> PassResult:
        rewired = 0
        for linear in state.linears.values():
            node = linear.node
            weight, _ = resolve_weight(node)
            source = node.inputs[1]
            direct = isinstance(source, gs.Constant) and len(source.outputs) == 1 and source.values.ndim == 2
            if node.op == "Gemm":
                self._fold_gemm_bias_beta(node)
                direct = direct and not node.attrs.get("transB", 0) and float(node.attrs.get("alpha", 1.0)) == 1.0
                node.attrs["transB"] = 0
                node.attrs["alpha"] = 1.0
            if direct:
                continue
            node.inputs[1] = gs.Constant(f"{linear.name}.weight", _kn_array(weight))
            rewired += 1
        state.graph.cleanup()
        return PassResult(f"{rewired} weights rewritten to a direct [K, N] constant", modified=rewired > 0,
                          stats={"rewired": rewired})

    @staticmethod
    def _fold_gemm_bias_beta(node: gs.Node) -> None:
        beta = float(node.attrs.get("beta", 1.0))
        if len(node.inputs) > 2 and beta != 1.0:
            bias = constant_value(node.inputs[2])
            node.inputs[2] = gs.Constant(f"{node.name}.bias", (bias * beta).astype(bias.dtype))
        node.attrs["beta"] = 1.0


def _kn_array(weight: np.ndarray) -> np.ndarray:
    """The [K, N] weight without a copy where it is the transpose of a contiguous [N, K] array (a
    Transpose-tied LM head: a 262144 x 640 table would otherwise be copied whole, its size again on
    top of the weights); later passes read it by blocks of columns or write new arrays."""
    if weight.flags.c_contiguous or weight.T.flags.c_contiguous:
        return weight
    return np.ascontiguousarray(weight)
