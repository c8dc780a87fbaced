"""The `moe` command line (entry point `cli.main:main`)."""
