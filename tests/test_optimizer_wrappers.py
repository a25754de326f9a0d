"""attach_optimizer unwraps frameworks' optimizer wrappers and is atomic."""

import pytest
import torch
from torch import nn

import prunekit as pk


class Wrapper:
    """A wrapper in the style of Lightning's LightningOptimizer: the optimizer is ``._optimizer``."""

    def __init__(self, optimizer):
        self._optimizer = optimizer


class SubclassWrapper(torch.optim.Optimizer):
    """In the style of Accelerate's AcceleratedOptimizer: an Optimizer subclass that never ran
    Optimizer.__init__ (no hook tables of its own) and keeps the real one as ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups


def test_wrappers_of_wrappers_are_unwrapped():
    model = nn.Linear(4, 4)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = pk.prune(model, 0.5, optimizer=Wrapper(SubclassWrapper(inner)))
    assert pruner.enforcer.optimizers == [inner]
    pruner.attach_optimizer(SubclassWrapper(inner))  # the same optimizer again: nothing changes
    assert pruner.enforcer.optimizers == [inner] and len(inner._optimizer_step_post_hooks) == 1


def test_a_failed_attach_leaves_the_optimizer_without_hooks(monkeypatch):
    model = nn.Linear(4, 4)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = pk.prune(model, 0.5, mask_gradients=True)

    def refuse(hook):
        raise RuntimeError("no post hooks here")

    monkeypatch.setattr(inner, "register_step_post_hook", refuse)
    with pytest.raises(RuntimeError, match="no post hooks"):
        pruner.attach_optimizer(inner)
    assert not inner._optimizer_step_pre_hooks and pruner.enforcer.optimizers == []
    monkeypatch.undo()
    pruner.attach_optimizer(inner)  # a retry works
    assert pruner.enforcer.optimizers == [inner]


def test_objects_that_wrap_no_optimizer_are_refused():
    pruner = pk.prune(nn.Linear(4, 4), 0.5)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        pruner.attach_optimizer(Wrapper(object()))
