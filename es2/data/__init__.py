"""Data: the normalised record format, file readers, importers, validation and pair construction."""
