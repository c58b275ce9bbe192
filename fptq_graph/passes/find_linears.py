"""Find the quantizable linears, their normalization producer and their siblings (an analysis).

The LM head (the linear producing the model output `logits`, directly or through reshapes/casts:
what our exporter and Hugging Face name it) is quantized as Config.lm_head says: int8 per output channel
by default (passes/plan_lm_head.py; a tied embedding table is then held once, quantized), INT4, or,
with lm_head="float", left out of the linears and listed as kept float, as GPTQ, AWQ and SmoothQuant
leave it: logits are the most error-sensitive product.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..errors import NoQuantizableLinearError
from ..graph_match import constant_value, is_channel_passthrough, norm_inputs, producer, resolve_weight, rms_norm_gain
from ..state import Linear, NormProducer, State


LOGITS = "logits"


class FindQuantizableLinears:
    name = "find_linears"

    def run(self, state: State) -> str:
        graph = state.graph
        skipped = 0
        unusable: list[str] = []   # MatMul/Gemm left float, with why (for the error when none is usable)
        outputs = {t.name for t in graph.outputs} & {LOGITS}
        self._keep_subgraph_linears_float(state)
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
            if state.config.lm_head_mode == "float" and _feeds_output(node, outputs):
                state.kept_float[node.name] = {
                    "name": node.name, "K": k, "N": n,
                    "reason": f"LM head (produces the model output '{LOGITS}'): kept float (lm_head='float'); "
                              "--lm-head int8 or int4 quantizes it"}
                continue
            activation = node.inputs[0]
            norm = self._find_producer(state, activation, k)
            group = norm.output.name if norm else activation.name
            linear = Linear(name=node.name, node=node, k=k, n=n, activation=activation, group=group,
                            producer=norm, output=node.outputs[0].name, weight_note=note)
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
        kept = f", LM head kept float ({', '.join(state.kept_float)})" \
            if state.kept_float else ""
        return (f"{len(state.linears)} quantizable linears, {len(state.producers)} normalization producers, "
                f"{skipped} MatMul/Gemm with non-constant weights left in float{kept}")

    @staticmethod
    def _keep_subgraph_linears_float(state: State) -> None:
        """Linears inside If/Loop/Scan bodies stay float, listed with the reason: observing and rewriting
        a subgraph needs its own outputs threaded out of the control flow, which we do not do."""
        def visit(graph: gs.Graph, owner: str) -> None:
            for node in graph.nodes:
                for attr in node.attrs.values():
                    for body in (attr if isinstance(attr, list) else [attr]):
                        if isinstance(body, gs.Graph):
                            visit(body, f"{node.op} '{node.name or node.op}'")
                if owner and node.op in ("MatMul", "Gemm"):
                    name = node.name or f"{owner} {node.op}"
                    weight = node.inputs[1] if len(node.inputs) > 1 else None
                    shape = list(getattr(weight, "shape", None) or [])
                    state.kept_float[name] = {
                        "name": name, "K": shape[0] if len(shape) == 2 else None,
                        "N": shape[1] if len(shape) == 2 else None,
                        "reason": f"inside the body of {owner}: linears in control-flow subgraphs are kept float"}

        visit(state.graph, "")

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


def _feeds_output(node: gs.Node, outputs: set[str]) -> str:
    """The model output `node` produces, directly or through reshapes/casts; "" when it does not."""
    tensor = node.outputs[0]
    while tensor.name not in outputs:
        consumers = list(tensor.outputs)
        if len(consumers) != 1 or consumers[0].op not in ("Reshape", "Cast", "Identity"):
            return ""
        tensor = consumers[0].outputs[0]
    return tensor.name
