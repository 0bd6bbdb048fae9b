"""H3Fusion: fuse helpful, harmless and honest LoRA experts into one mixture-of-experts LLM.

Reproducible companion to Tekin et al., "H3Fusion: Helpful, Harmless, Honest Fusion of Aligned
LLMs" (arXiv 2411.17792). See the book for the method, the results and the deviations from the paper.
"""

import warnings

from h3fusion.config import TASKS, ConfigError, Profile, load_profile

# peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` whenever it wraps a model (every expert,
# baseline and evaluation load): a FutureWarning about peft's code, not ours, that readers cannot act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__all__ = ["TASKS", "ConfigError", "Profile", "load_profile"]
__version__ = "0.1.0"
