"""The confounder dictionary: scene features, k-means, the cached file, and the recipe that owns load-or-build."""
