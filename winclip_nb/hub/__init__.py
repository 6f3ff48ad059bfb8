"""Model weights: the resolver for open_clip names, tags and files, and prefetching."""
