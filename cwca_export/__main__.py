"""`python -m cwca_export` runs the CLI."""

from cwca_export.cli import main

main()
