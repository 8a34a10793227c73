"""Built-in meta-algorithms. The host drives each: ``setup`` → ``train_step`` × N → ``predict``."""

from autometa_builtins.meta_algorithms._common import embed
from autometa_builtins.meta_algorithms.blackbox import MANN, SNAIL
from autometa_builtins.meta_algorithms.finetune import FineTune
from autometa_builtins.meta_algorithms.gradient import ANIL, FOMAML, MAML, MetaSGD, Reptile
from autometa_builtins.meta_algorithms.linear import Linear
from autometa_builtins.meta_algorithms.learned import MetaLSTM, MetaTransfer
from autometa_builtins.meta_algorithms.metric import MatchingNet, ProtoNet, RelationNet, prototype_logits
from autometa_builtins.meta_algorithms.trees import Forest, GradientBoosting

# Registered in this order; the first supporting a protocol is not special.
META_ALGORITHMS = [ProtoNet, MAML, FOMAML, ANIL, MetaSGD, MetaLSTM, MetaTransfer, Reptile, FineTune, RelationNet, MatchingNet, MANN, SNAIL,
                   GradientBoosting, Linear, Forest]

__all__ = [
    "META_ALGORITHMS", "ANIL", "MANN", "SNAIL", "FOMAML", "FineTune", "Forest", "GradientBoosting", "Linear", "MAML", "MetaLSTM", "MetaSGD", "MetaTransfer", "Reptile", "MatchingNet", "ProtoNet", "RelationNet", "embed", "prototype_logits",
]
