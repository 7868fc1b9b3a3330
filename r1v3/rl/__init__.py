"""GRPO math (advantages, clipped surrogate, KL estimators, entropy) and, later, the rollout side.

The modules here are pure tensor functions with no model or Lightning dependency, so they can be
tested against hand-computed values.
"""
