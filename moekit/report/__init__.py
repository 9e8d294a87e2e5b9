"""Drawing the reports the steps return (plain dicts, the same as their JSON): nothing here computes a number.

- ``tables``: the terminal (rich tables, tokens coloured by expert);
- ``figures``: the charts (one heatmap, training curves, eval bars) as PNG data URIs or files;
- ``html``: the one HTML writer (style, tables, embedded figures, atomic write);
- ``inspect_page``: ``inspect --plot``'s PNG files and routing page;
- ``run_page``: ``moekit report``'s page for a run directory (filled by ``moekit.steps.report``).
"""
