"""Running what the compiler writes: ONNX Runtime sessions with the bundled op library, the op's Python
side, and ONNX Runtime's error text turned into ours.

sessions.py    session(), library_path(), library_info(): one call from a model (proto, split or path) to a session
w4a8_op.py     the fptq::W4A8MatMul contract: weight packing, ONNX schema, float64 reference
ort_errors.py  ONNX Runtime's failures as one line naming the model, the node and the cause
"""
from fptq_graph.runtime import sessions
from fptq_graph.runtime.sessions import (CPU_ISA_ENV, LIBRARY_NAME, PROVIDERS, library_info, library_path,
                                         session, session_options)

__all__ = ["session", "session_options", "library_path", "library_info", "PROVIDERS", "CPU_ISA_ENV",
           "LIBRARY_NAME", "sessions"]
