"""Data: the normalised record format, importers, validation and pair construction."""
