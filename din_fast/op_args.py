"""The custom ops' argument lists, by name.

A torch custom op takes flat arguments (tensors, lists of tensors, scalars);
autograd hands them back to the backward as one tuple. These named tuples
are that tuple: built from a validated problem, turned back into one, and
used to return gradients by name, so no code indexes an op's inputs by
position. ``check_signature`` ties each op function's parameters to its tuple
at import time: a schema change that forgets one side fails loudly.
"""

from __future__ import annotations

import inspect
from typing import List, NamedTuple, Optional, get_type_hints

import torch
from torch import Tensor

from .problem import DINProblem, JaggedDINProblem

NO_NORMALIZATION = "none"   # an op schema has no None for a str: normalization=None
PARAMS_PER_LAYER = {"sigmoid": 0, "relu": 0, "prelu": 1, "dice": 3}


# The fields every op has after its history: the activation unit and the options.
UNIT_FIELDS = [("weights", List[Tensor]), ("biases", List[Tensor]),
               ("act_params", List[Tensor]), ("activation", str), ("normalization", str),
               ("scale", float), ("dice_eps", float)]


class AttentionArgs(NamedTuple("AttentionFields", [
        ("query", Tensor), ("keys", Tensor), ("values", Optional[Tensor]),
        ("lengths", Optional[Tensor]), ("mask", Optional[Tensor])] + UNIT_FIELDS)):
    """The arguments of din_attention's ops (padded histories)."""

    __slots__ = ()

    @classmethod
    def of(cls, problem: DINProblem) -> "AttentionArgs":
        return cls(problem.query, problem.keys, problem.values, problem.lengths, problem.mask,
                   *_unit_args(problem))

    def problem(self) -> DINProblem:
        return DINProblem(query=self.query, keys=self.keys, values=self.values,
                          lengths=self.lengths, mask=self.mask, **_unit_fields(self))


class JaggedAttentionArgs(NamedTuple("JaggedAttentionFields", [
        ("query", Tensor), ("keys_values", Tensor), ("values", Optional[Tensor]),
        ("offsets", Tensor), ("max_len", int)] + UNIT_FIELDS)):
    """The arguments of din_attention_jagged's ops."""

    __slots__ = ()

    @classmethod
    def of(cls, problem: JaggedDINProblem) -> "JaggedAttentionArgs":
        return cls(problem.query, problem.keys_values, problem.values, problem.offsets,
                   problem.max_len, *_unit_args(problem))

    def problem(self) -> JaggedDINProblem:
        return JaggedDINProblem(query=self.query, keys_values=self.keys_values,
                                values=self.values, offsets=self.offsets,
                                max_len=self.max_len, **_unit_fields(self))


# How an op schema spells each field type.
SCHEMA_TYPES = {Tensor: "Tensor", Optional[Tensor]: "Tensor?", List[Tensor]: "Tensor[]",
                str: "str", float: "float", int: "SymInt"}


def op_schema(fields: type, returns: str, leading: tuple = (), trailing: tuple = ()) -> str:
    """The schema of an op over ``leading`` (spelled as in a schema: "Tensor
    grad_pooled"), ``fields``, then ``trailing``, returning ``returns``."""
    arguments = list(leading) + [f"{SCHEMA_TYPES[kind]} {name}"
                                 for name, kind in get_type_hints(fields).items()]
    arguments += list(trailing)
    return f"({', '.join(arguments)}) -> {returns}"


def save_arguments(ctx, args, *outputs: Tensor) -> None:
    """Save a forward op's argument tuple on its autograd ``ctx``, and the
    ``outputs`` its backward needs; ``saved_arguments`` gives both back."""
    named = args._asdict()
    ctx.fields = type(args)
    ctx.singles = [name for name, v in named.items() if v is None or isinstance(v, Tensor)]
    ctx.lists = [(name, len(v)) for name, v in named.items() if isinstance(v, list)]
    ctx.options = {name: v for name, v in named.items()
                   if name not in ctx.singles and not isinstance(v, list)}
    ctx.save_for_backward(*(named[name] for name in ctx.singles),
                          *(t for name, _ in ctx.lists for t in named[name]), *outputs)


def saved_arguments(ctx) -> tuple:
    """(the argument tuple, [the saved outputs]) that save_arguments saved."""
    saved = iter(ctx.saved_tensors)
    named = {name: next(saved) for name in ctx.singles}
    named.update({name: [next(saved) for _ in range(n)] for name, n in ctx.lists})
    return ctx.fields(**named, **ctx.options), list(saved)


def _unit_args(problem) -> tuple:
    """(weights, biases, act_params, activation, normalization, scale, dice_eps)
    of a problem, in op form: act_params flat, normalization a string."""
    flat_params = [p for layer in problem.act_params for p in layer]
    return (list(problem.weights), list(problem.biases), flat_params, problem.activation,
            problem.normalization or NO_NORMALIZATION, problem.scale, problem.dice_eps)


def _unit_fields(args) -> dict:
    """The problem fields of the unit and the options, back from op form."""
    per_layer = PARAMS_PER_LAYER[args.activation]
    layers = len(args.weights) - 1
    act_params = [tuple(args.act_params[i * per_layer:(i + 1) * per_layer])
                  for i in range(layers)]
    return dict(weights=list(args.weights), biases=list(args.biases),
                activation=args.activation, act_params=act_params,
                normalization=None if args.normalization == NO_NORMALIZATION
                else args.normalization,
                scale=args.scale, dice_eps=args.dice_eps, squeeze_candidates=False)


class InputGrads(NamedTuple):
    """A backward op's result: the gradient of every tensor input of the
    forward (empty for values when there are none; the kernels' and the
    torch backend's backward return the same)."""

    query: Tensor
    history: Tensor
    values: Tensor
    weights: List[Tensor]
    biases: List[Tensor]
    act_params: List[Tensor]

    def flat(self) -> List[Tensor]:
        return [self.query, self.history, self.values, *self.weights, *self.biases,
                *self.act_params]

    @classmethod
    def unflat(cls, flat, num_weights: int) -> "InputGrads":
        query, history, values, *rest = flat
        return cls(query, history, values, list(rest[:num_weights]),
                   list(rest[num_weights:2 * num_weights]), list(rest[2 * num_weights:]))

    @classmethod
    def of(cls, grads, history: Tensor) -> "InputGrads":
        """From a backward's (dq, d history, dv or None, dweights, dbiases, dact
        per layer), each contiguous and a tensor of its own (an op's outputs
        may not alias)."""
        dq, dh, dv, dweights, dbiases, dact = grads
        flat = [dq, dh, history.new_empty(0) if dv is None else dv, *dweights, *dbiases,
                *(g for layer in dact for g in layer)]
        return cls.unflat([g.contiguous() for g in flat], len(dweights))

    def as_inputs(self, fields: type, has_values: bool, **others) -> tuple:
        """The gradients as a ``fields`` tuple of the forward's inputs (None for
        the non-tensors), then ``others`` (the op's trailing arguments)."""
        history = "keys" if "keys" in fields._fields else "keys_values"
        named = dict(query=self.query, values=self.values if has_values else None,
                     weights=self.weights, biases=self.biases, act_params=self.act_params)
        named[history] = self.history
        return (*(named.get(name) for name in fields._fields), *others.values())


def fake_input_grads(grad_pooled, grad_scores, query, history, values, *rest) -> List[Tensor]:
    """A backward op's fake result: empty gradients shaped like the inputs
    (``rest`` holds the layout arguments, then weights, biases, act_params)."""
    weights, biases, act_params = next((rest[i], rest[i + 1], rest[i + 2])
                                       for i in range(len(rest)) if isinstance(rest[i], list))
    dv = history.new_empty(0) if values is None else torch.empty_like(values)
    return [torch.empty_like(query), torch.empty_like(history), dv,
            *(torch.empty_like(t) for t in (*weights, *biases, *act_params))]


def check_signature(function, fields: type, leading: tuple = (), trailing: tuple = ()) -> None:
    """Raise unless ``function``'s parameters are ``leading``, then ``fields``'s,
    then ``trailing``."""
    names = tuple(inspect.signature(function).parameters)
    expected = tuple(leading) + fields._fields + tuple(trailing)
    if names != expected:
        raise TypeError(f"{function.__qualname__} takes {names}; its argument tuple "
                        f"{fields.__name__} needs {expected}")
