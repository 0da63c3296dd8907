"""Toy datasets in each raw source format, written from scratch (no converter code), one module per format."""
