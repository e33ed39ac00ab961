"""Meta-learning over adapter parameter trees: Reptile, first-order and second-order MAML."""

from metapeft.meta.learner import (ALGORITHMS, MetaConfig, MetaLearner, inner_adapt,
                                   query_accuracy, task_contribution)

__all__ = ["ALGORITHMS", "MetaConfig", "MetaLearner", "inner_adapt", "query_accuracy",
           "task_contribution"]
