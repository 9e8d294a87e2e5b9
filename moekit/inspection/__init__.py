"""``moekit inspect``: static statistics of an MoE checkpoint and its routing on data."""
