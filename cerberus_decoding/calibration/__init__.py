"""Calibration: measure (measure.py), choose (choose.py), check and run (run.py), files (files.py)."""
