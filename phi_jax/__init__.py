"""phi_jax: Microsoft's Phi language models (phi-1, phi-1.5, phi-2) in JAX / Flax NNX."""

from phi_jax.compiled import compiled
from phi_jax.config import PhiConfig, phi_1, phi_1_5, phi_2
from phi_jax.modeling.model import (
    PhiForCausalLM,
    PhiForSequenceClassification,
    PhiForTokenClassification,
    PhiModel,
    PhiOutput,
)
from phi_jax.shipped.paths import shipped_model_path

__all__ = [
    "PhiConfig", "phi_1", "phi_1_5", "phi_2", "PhiModel", "PhiForCausalLM", "PhiForSequenceClassification",
    "PhiForTokenClassification", "PhiOutput", "compiled", "shipped_model_path",
]
__version__ = "0.1.0"
