"""Routers: initialisation (random, centroid), and later balancing losses and statistics."""
