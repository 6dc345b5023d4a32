from decision_transformer.training.losses import masked_action_mse
from decision_transformer.training.optim import freeze, make_optimizer, warmup_schedule
from decision_transformer.training.trainer import GRAD_CLIP, Trainer

__all__ = ["GRAD_CLIP", "Trainer", "freeze", "make_optimizer", "masked_action_mse", "warmup_schedule"]
