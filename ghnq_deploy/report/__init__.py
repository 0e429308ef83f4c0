"""The paper's evaluation: engine (evaluate.py), Table 1 (table1.py), plots (plot.py)."""
