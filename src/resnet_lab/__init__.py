"""resnet-lab: a tracked, reproducible study of the degradation problem and how skip connections solve it.

He et al. 2015, "Deep Residual Learning for Image Recognition", arXiv:1512.03385.
"""

import os

__version__ = "0.1.0"

# TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs with neural-network features
# (AVX512_VNNI, AVX512_BF16, AMX); on an AVX2-only CPU it uses Eigen's, and training there ran 5.1x
# (resnet34) to 5.7x (plain18) slower (python -m resnet_lab.bench, 32 px, batch 64, memory input).
# Read when TensorFlow is first imported, which every entry point does after this;
# TF_ENABLE_ONEDNN_OPTS=0 in the environment still turns them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
