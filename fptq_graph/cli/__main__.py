"""`python -m fptq_graph.cli`: the fptq-graph command."""
from fptq_graph.cli import command

command()
