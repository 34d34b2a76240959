"""Tasks: what a batch means, the loss, and the metrics. One module per task."""
