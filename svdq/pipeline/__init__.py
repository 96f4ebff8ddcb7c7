"""The compression pipeline: the walk over blocks, the eps planner, the budget's two passes
and their judge."""
