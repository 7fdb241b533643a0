"""Nucleus datasets: loaders, registration in DatasetCatalog, the mapper and the synthetic generator."""
