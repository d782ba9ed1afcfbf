"""Per-task pieces: losses, metrics, post-processing."""
