"""Data: scan catalog, validation, preprocessing, phantoms."""
