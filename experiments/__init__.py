"""Declarative experiments and tables (YAML), shipped as ``kdlab.experiments`` package data."""
