"""What an annotation output and a training run hold, and the commands that read them: the Parquet schema,
readers and the ``--where`` filter, inspect, render, export, similar and report."""
