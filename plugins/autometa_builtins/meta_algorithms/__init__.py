"""Built-in meta-algorithms. The host drives each: ``setup`` → ``train_step`` × N → ``predict``."""

from autometa_builtins.meta_algorithms._common import embed
from autometa_builtins.meta_algorithms.finetune import FineTune
from autometa_builtins.meta_algorithms.gradient import MAML
from autometa_builtins.meta_algorithms.metric import ProtoNet, prototype_logits

# Registered in this order; the first supporting a protocol is not special.
META_ALGORITHMS = [ProtoNet, MAML, FineTune]

__all__ = ["META_ALGORITHMS", "FineTune", "MAML", "ProtoNet", "embed", "prototype_logits"]
