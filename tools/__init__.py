"""Command-line tools and evaluation on top of the other subpackages."""
