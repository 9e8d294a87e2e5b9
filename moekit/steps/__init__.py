"""One plain function per subcommand; the CLI only parses options and renders results."""
