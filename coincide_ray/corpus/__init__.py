"""The input corpus: record shards (pure, shards.py) and the Ray tasks that make and read them
(stage.py)."""
