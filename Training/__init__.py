"""Headless training, data preparation, simulation and evaluation for CT kernel harmonization."""
