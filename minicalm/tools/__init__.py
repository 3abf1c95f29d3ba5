"""The machinery of runs: evaluation and its report, the memory planner, pictures, the adapter inspector, a training
run's bookkeeping, and the command line (`python -m minicalm COMMAND`)."""
