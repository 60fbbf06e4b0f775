"""Model recipes (TOML data) shipped with hicache3d."""
