"""Find the quantizable linears, their normalization producer and their siblings (an analysis).

The LM head (the linear producing the model output `logits`, directly or through reshapes/casts:
what our exporter and Hugging Face name it) is quantized as Config.lm_head says: int8 per output channel
by default (passes/analysis/plan_lm_head.py; a tied embedding table is then held once, quantized), INT4, or,
with lm_head="float", left out of the linears and listed as kept float, as GPTQ, AWQ and SmoothQuant
leave it: logits are the most error-sensitive product.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from fptq_graph.errors import ModelLoadError, NoQuantizableLinearError
from fptq_graph.patterns.graph_match import constant_value, is_channel_passthrough, norm_inputs, producer, resolve_weight, rms_norm_gain
from fptq_graph.ir.bodies import gs_body_nodes
from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.passes.rewrite.rotate_residual import HEAD_GAIN_PREFIX, ROTATION_PREFIX
from fptq_graph.passes.state import Linear, NormProducer, State
from fptq_graph.patterns.lm_head import LOGITS, feeds_output


def _check_inner_dimension(node, activation, k: int, n: int) -> None:
    """A linear whose input's last dimension is known and is not its weight's K cannot run: said here,
    naming the node, instead of as a reshape failure deep inside calibration."""
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return   # the input is [K, M] there
    shape = getattr(activation, "shape", None)
    if shape and isinstance(shape[-1], int) and shape[-1] >= 0 and shape[-1] != k:
        raise ModelLoadError(f"{node.op} '{node.name}' multiplies '{activation.name}' (last dimension {shape[-1]}) by a "
                             f"[{k}, {n}] weight: the inner dimensions differ, so the model cannot run")


class FindQuantizableLinears(Pass):
    name = "find_linears"
    kind = "analysis"
    ensures = frozenset({"linears"})

    def run(self, state: State) -> PassResult:
        graph = state.graph
        skipped = 0
        unusable: list[str] = []   # MatMul/Gemm left float, with why (for the error when none is usable)
        outputs = {t.name for t in graph.outputs} & {LOGITS}
        in_bodies = self._keep_subgraph_linears_float(state)
        for index, node in enumerate(graph.nodes):
            if node.op not in ("MatMul", "Gemm"):
                continue
            weight, note = resolve_weight(node)
            if weight is None:
                skipped += 1
                unusable.append(f"{node.op} '{node.name or index}' ({note})")
                continue
            if not node.name or node.name in state.linears:
                node.name = f"{node.op}_{index}"
            k, n = weight.shape
            if node.name.startswith(ROTATION_PREFIX):
                what = ("the final norm's gain in rotated coordinates, before the tied LM head"
                        if node.name.startswith(HEAD_GAIN_PREFIX) else "a down projection's run-time input rotation")
                state.kept_float[node.name] = {"name": node.name, "K": k, "N": n,
                                               "reason": f"{what} (rotate_residual): kept float"}
                continue
            if state.config.lm_head_mode == "float" and feeds_output(node, outputs):
                state.kept_float_head = node.name
                state.kept_float[node.name] = {
                    "name": node.name, "K": k, "N": n,
                    "reason": f"LM head (produces the model output '{LOGITS}'): kept float (lm_head='float'); "
                              "--lm-head int8 or int4 quantizes it"}
                continue
            activation = node.inputs[0]
            _check_inner_dimension(node, activation, k, n)
            norm = self._find_producer(state, activation, k)
            sibling_tensor = norm.output.name if norm else activation.name
            linear = Linear(name=node.name, node=node, k=k, n=n, activation=activation, sibling_tensor=sibling_tensor,
                            producer=norm, output=node.outputs[0].name, weight_source=note)
            state.linears[linear.name] = linear
            if norm:
                norm.linears.append(linear.name)
        if not state.linears:
            why = f"; skipped: {', '.join(unusable[:6])}{', ...' if len(unusable) > 6 else ''}" if unusable else ""
            raise NoQuantizableLinearError(
                f"no quantizable linear: the graph has no MatMul/Gemm whose weight is a constant initializer{why}"
            )
        for norm in state.producers.values():
            norm.other_consumers = self._other_consumers(state, norm)
        head = [state.kept_float_head] if state.kept_float_head else []
        kept = f", LM head kept float ({', '.join(head)})" if head else ""
        kept += f", {len(in_bodies)} linear(s) in control-flow bodies kept float ({', '.join(in_bodies)})" if in_bodies else ""
        return PassResult(f"{len(state.linears)} quantizable linears, {len(state.producers)} normalization producers, "
                          f"{skipped} MatMul/Gemm with non-constant weights left in float{kept}",
                          stats={"linears": len(state.linears), "producers": len(state.producers),
                                 "non_constant_weights": skipped, "head_kept_float": len(head),
                                 "in_bodies_kept_float": len(in_bodies)})

    @staticmethod
    def _keep_subgraph_linears_float(state: State) -> list[str]:
        """Linears inside If/Loop/Scan bodies stay float, listed with the reason: observing and rewriting
        a subgraph needs its own outputs threaded out of the control flow, which we do not do."""
        names = []
        for node, owner in gs_body_nodes(state.graph):
            if owner and node.op in ("MatMul", "Gemm"):
                name = node.name or f"{owner} {node.op}"
                weight = node.inputs[1] if len(node.inputs) > 1 else None
                shape = list(getattr(weight, "shape", None) or [])
                state.kept_float[name] = {
                    "name": name, "K": shape[0] if len(shape) == 2 else None,
                    "N": shape[1] if len(shape) == 2 else None,
                    "reason": f"inside the body of {owner}: linears in control-flow subgraphs are kept float"}
                names.append(name)
        return names

    def _find_producer(self, state: State, activation: gs.Tensor, k: int) -> NormProducer | None:
        tensor = activation
        while True:
            node = producer(tensor)
            if node is None:
                return None
            if norm_inputs(node) is not None or rms_norm_gain(node, k) is not None:
                break
            if not is_channel_passthrough(node, k):
                return None
            tensor = node.inputs[0]
        out = node.outputs[0]
        if out.name in state.producers:
            return state.producers[out.name]
        if norm_inputs(node) is not None:
            gamma_index, beta_index = norm_inputs(node)
            kind = node.op
            # The scale divides the gain (and bias) along the channel axis: they must have one of length k.
            for index in (gamma_index, beta_index):
                value = constant_value(node.inputs[index]) if index is not None else None
                if value is not None and (value.ndim == 0 or value.shape[-1] != k):
                    return None
        else:
            gamma_index, beta_index, kind = rms_norm_gain(node, k), None, "RMSNorm (decomposed)"
        norm = NormProducer(node=node, kind=kind, gamma_index=gamma_index, beta_index=beta_index, output=out)
        state.producers[out.name] = norm
        return norm

    def _other_consumers(self, state: State, norm: NormProducer) -> list[tuple[gs.Node, gs.Tensor]]:
        """Consumers of the normalized tensor (through channel passthroughs) that are not its linears."""
        k = state.linears[norm.linears[0]].k
        linear_inputs = {(id(state.linears[name].node), state.linears[name].activation.name) for name in norm.linears}
        others, frontier = [], [norm.output]
        while frontier:
            tensor = frontier.pop()
            for consumer in tensor.outputs:
                if (id(consumer), tensor.name) in linear_inputs:
                    continue
                if is_channel_passthrough(consumer, k) and consumer.inputs[0] is tensor:
                    frontier.append(consumer.outputs[0])
                else:
                    others.append((consumer, tensor))
        return others


def foldable(norm: NormProducer, graph_outputs: set[str], compensate: bool) -> str:
    """Empty if LAE can fold into `norm`; otherwise the reason it cannot."""
    gamma = constant_value(norm.node.inputs[norm.gamma_index])
    if gamma is None:
        return f"{norm.kind} '{norm.node.name}' has a non-constant gain"
    if norm.beta_index is not None and constant_value(norm.node.inputs[norm.beta_index]) is None:
        return f"{norm.kind} '{norm.node.name}' has a non-constant bias"
    if norm.output.name in graph_outputs:
        return f"{norm.kind} '{norm.node.name}' output is a graph output"
    if norm.other_consumers and not compensate:
        names = ", ".join(sorted({node.name or node.op for node, _ in norm.other_consumers}))
        return f"{norm.kind} '{norm.node.name}' also feeds {names} (residual compensation disabled)"
    return ""
