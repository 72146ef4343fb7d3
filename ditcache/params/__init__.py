"""Shipped calibration params and their loader."""
