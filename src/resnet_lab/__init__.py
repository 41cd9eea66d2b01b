"""resnet-lab: a tracked, reproducible study of the degradation problem and how skip connections solve it.

He et al. 2015, "Deep Residual Learning for Image Recognition", arXiv:1512.03385.
"""

__version__ = "0.1.0"
