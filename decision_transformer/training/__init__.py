from decision_transformer.training.losses import masked_action_mse
from decision_transformer.training.optim import (freeze, freeze_from_args, make_optimizer, optimizer_from_args,
                                                 warmup_schedule)
from decision_transformer.training.trainer import (GRAD_CLIP, ActTrainer, Trainer, apply_update, check_batch_shape,
                                                   compile_module, freeze_unreached, mark_step, module_mode, rank_slice,
                                                   warn_context_mismatch)

__all__ = ["GRAD_CLIP", "ActTrainer", "Trainer", "apply_update", "check_batch_shape", "compile_module", "mark_step",
           "freeze", "freeze_unreached", "rank_slice", "warn_context_mismatch", "module_mode",
           "freeze_from_args", "make_optimizer", "optimizer_from_args", "masked_action_mse", "warmup_schedule"]
