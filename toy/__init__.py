"""The embedded toy world: a chain-arithmetic task family, its tiny model and its hard set."""
