"""Console scripts: argument parsing, then one library call each."""
