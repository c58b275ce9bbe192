"""`python -m fptq_graph.cli`: the fptq-graph command."""
import sys

from fptq_graph.cli import main

sys.exit(main())
