"""Graph patterns the passes match: normalizations and weights (graph_match.py), the LM head and its
tied lookups (lm_head.py), a linear's bias (bias.py)."""
