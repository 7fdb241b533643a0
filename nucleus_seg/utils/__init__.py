"""Small shared helpers: files (atomic writes, suffixes, names, JSON), distributed launch, RLE, versions."""
