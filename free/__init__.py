"""free-pipeline: FREE (Faster and Better Data-Free Meta-Learning, CVPR 2024) as an MLOps pipeline.

The package is a pure PyTorch core: data, models, and (later) teachers, inversion, task cache,
meta-learner and evaluation. Orchestration lives in ``flows/``, configuration in ``params/``.
"""

__version__ = "0.1.0"
