"""The hooks of layers whose weights are read rather than called.

DINAttention, and the peer adapters on their fused path, never call their
``nn.Linear`` layers: the unit is computed from the layers' weights, without
ever building a layer's input. PyTorch's module-hook reparametrizations
(``torch.nn.utils.weight_norm``, ``spectral_norm``, ``prune``) recompute a
layer's ``weight`` attribute in a forward pre-hook; a forward that skipped the
hook would read the weight of the last call, stale after ``load_state_dict``
or an optimizer step. :func:`run_weight_hooks` runs those hooks as a call of
the layer would, before its weights are read, and refuses, naming it, a hook
that cannot run without the layer's input or output.

``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``, ...) needs
nothing here: its ``weight`` is computed on every read.
"""

from __future__ import annotations

from typing import Iterable, Tuple

from torch import nn

# What a pre-hook raises when it needs the input the layer never receives
# (inputs[0] of an empty tuple, an attribute of None, ...); any other error
# is the hook's own and passes through unchanged.
_NEEDS_INPUT = (IndexError, TypeError, AttributeError, ValueError, KeyError)


def _hook_name(hook) -> str:
    name = getattr(hook, "__qualname__", None) or type(hook).__qualname__
    module = getattr(hook, "__module__", None) or type(hook).__module__
    return f"{module}.{name}"


def run_weight_hooks(owner: str, layers: Iterable[Tuple[str, nn.Module]]) -> None:
    """Run the forward pre-hooks of ``layers`` ((name, module) pairs, the
    names as the user reaches them, e.g. "hidden.0") with no inputs, as
    ``owner`` reads their weights without calling them.

    Raises ValueError naming the layer and the hook for a forward hook or a
    backward hook (the layer has no output to hand it), and for a pre-hook
    that returns new inputs or fails for want of them.
    """
    for name, layer in layers:
        if not (layer._forward_pre_hooks or layer._forward_hooks or layer._backward_hooks
                or layer._backward_pre_hooks):
            continue                      # the common case: nothing to run
        never_called = (f"{owner} never calls `{name}`: it reads its parameters, so the "
                        "layer has no input or output to hand a hook")
        for kind, hooks in (("forward ", layer._forward_hooks),
                            ("backward ", layer._backward_hooks),
                            ("backward pre-", layer._backward_pre_hooks)):
            for hook in hooks.values():
                raise ValueError(f"{owner}: `{name}` has a {kind}hook {_hook_name(hook)}, which "
                                 f"cannot run: {never_called}. Register it on the {owner} "
                                 "instead")
        for hook_id, hook in list(layer._forward_pre_hooks.items()):
            try:
                if hook_id in layer._forward_pre_hooks_with_kwargs:
                    result = hook(layer, (), {})
                else:
                    result = hook(layer, ())
            except _NEEDS_INPUT as error:
                raise ValueError(f"{owner}: the forward pre-hook {_hook_name(hook)} of `{name}` "
                                 f"failed when run without inputs ({type(error).__name__}: "
                                 f"{error}); {never_called}. Pre-hooks that recompute the "
                                 "weights (torch.nn.utils.weight_norm, spectral_norm, prune) "
                                 "run") from error
            if result is not None:
                raise ValueError(f"{owner}: the forward pre-hook {_hook_name(hook)} of `{name}` "
                                 f"returns new inputs, which cannot be used: {never_called}")
