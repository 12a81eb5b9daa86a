"""Layer 5: the jobs (build_refcache, train, evaluate, bon_sampling, demo), each readable top to bottom.

`engines.build_engines` builds what a job needs; a training step's phases are in `experience` (on-policy)
and `offline` (the baselines trained on the reference cache); `rollout` samples and scores.
"""
