"""The run directory: its checkpoint and resume (checkpoint.py) and its live curves (tblog.py)."""
