"""`python -m minicalm COMMAND`: generate, merge, convert, plan, plot, stats, serve (each with --help)."""
from .tools.commands import main

main()
