"""Find the quantizable linears, their normalization producer and their siblings (an analysis).

The LM head (the linear producing the model output `logits`, directly or through reshapes/casts:
what our exporter and Hugging Face name it) is left float unless Config.quantize_lm_head, as weight-quantization practice does (GPTQ, AWQ,
SmoothQuant keep it): logits are the most error-sensitive product, and in tied-embedding models
its weight is the embedding table, which stays float for the lookup anyway.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..errors import NoQuantizableLinearError
from ..graph_match import NORM_OPS, constant_value, is_channel_passthrough, producer, resolve_weight, rms_norm_gain
from ..state import Linear, NormProducer, State


LOGITS = "logits"


class FindQuantizableLinears:
    name = "find_linears"

    def run(self, state: State) -> str:
        graph = state.graph
        skipped = 0
        outputs = {t.name for t in graph.outputs} & {LOGITS}
        for index, node in enumerate(graph.nodes):
            if node.op not in ("MatMul", "Gemm"):
                continue
            weight, note = resolve_weight(node)
            if weight is None:
                skipped += 1
                continue
            if not node.name or node.name in state.linears:
                node.name = f"{node.op}_{index}"
            k, n = weight.shape
            if not state.config.quantize_lm_head and _feeds_output(node, outputs):
                state.kept_float[node.name] = {
                    "name": node.name, "K": k, "N": n,
                    "reason": f"LM head (produces the model output '{LOGITS}'): kept float; "
                              "quantize_lm_head (--quantize-lm-head) quantizes it"}
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
            raise NoQuantizableLinearError(
                "no quantizable linear: the graph has no MatMul/Gemm whose weight is a constant initializer"
            )
        for norm in state.producers.values():
            norm.other_consumers = self._other_consumers(state, norm)
        kept = f", LM head kept float ({', '.join(state.kept_float)})" \
            if state.kept_float else ""
        return (f"{len(state.linears)} quantizable linears, {len(state.producers)} normalization producers, "
                f"{skipped} MatMul/Gemm with non-constant weights left in float{kept}")

    def _find_producer(self, state: State, activation: gs.Tensor, k: int) -> NormProducer | None:
        tensor = activation
        while True:
            node = producer(tensor)
            if node is None:
                return None
            if node.op in NORM_OPS or rms_norm_gain(node, k) is not None:
                break
            if not is_channel_passthrough(node, k):
                return None
            tensor = node.inputs[0]
        out = node.outputs[0]
        if out.name in state.producers:
            return state.producers[out.name]
        if node.op in NORM_OPS:
            gamma_index, beta_index = NORM_OPS[node.op]
            if beta_index is not None and len(node.inputs) <= beta_index:
                beta_index = None
            kind = node.op
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
