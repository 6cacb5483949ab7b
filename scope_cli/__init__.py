"""scope-rl: SCOPE (step-wise off-policy rectification for RLVR) as a pipeline of offline stages."""

__version__ = "0.1.0"
