"""Models: loading, layer adapters and targets, streaming a source block by block."""
