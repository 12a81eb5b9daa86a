"""Layer 5b, jobs: train, build_refcache, evaluate (+ report), bon_sampling; each reads top to bottom like a
recipe."""
