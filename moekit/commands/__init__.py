"""The command functions `moekit.cli` registers: Typer only (parse options, build a config, call one step, render)."""
