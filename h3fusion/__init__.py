"""H3Fusion: fuse helpful, harmless and honest LoRA experts into one mixture-of-experts LLM.

Reproducible companion to Tekin et al., "H3Fusion: Helpful, Harmless, Honest Fusion of Aligned
LLMs" (arXiv 2411.17792). See the book for the method, the results and the deviations from the paper.
"""

from h3fusion.config import TASKS, ConfigError, Profile, load_profile

__all__ = ["TASKS", "ConfigError", "Profile", "load_profile"]
__version__ = "0.1.0"
