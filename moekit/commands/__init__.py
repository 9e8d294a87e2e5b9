"""CLI command modules; each registers one command on ``moekit.cli.app`` when imported."""
