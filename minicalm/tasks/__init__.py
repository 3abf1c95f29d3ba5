"""The machinery of tasks: a task's prompt and label words, its rows and data files, the answer rule and metrics."""
