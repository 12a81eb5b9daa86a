"""Layer 5: the jobs (refcache, train, evaluate, bon, demo), each readable top to bottom like a recipe."""
