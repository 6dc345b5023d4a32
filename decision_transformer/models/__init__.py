from decision_transformer.models.decision_transformer import DecisionTransformer, DTConfig, DTOutput
from decision_transformer.models.gpt2 import BackboneConfig, GPT2Backbone

__all__ = ["BackboneConfig", "DTConfig", "DTOutput", "DecisionTransformer", "GPT2Backbone"]
