"""The fast pure-PyTorch backend: the CPU default and the fallback everywhere.

Three savings over the literal formula, all exact:
- the first layer is folded, never building the [.., T, 4D] concat:
  W_1 [q, k, q-k, q*k] = (W_q + W_d) q + (W_k - W_d) k + W_p (q*k), where the
  first term is computed once per candidate and the second once per key,
  shared by every candidate of the row;
- the MLP runs on the valid positions only, packed; padding costs nothing;
- the backward is written by hand (``packed_backward``): it keeps only the
  pre-activations of the packed positions (no concat, no autograd graph of
  the MLP) and recomputes the rest.

Forward and backward are opaque custom ops (din_fast::torch_attention_forward
and din_fast::torch_attention_backward, at the end of this file), so that
torch.compile calls them whole, with the same speed as eager mode, instead of
tracing a graph of aten ops (which could not pack: the number of valid
positions depends on the data). The backward op also serves the triton
backend's autograd formula wherever its fused backward does not reach.

A Dice gate hook (``dice_gate``: batch statistics in training, the peers'
BatchNorm) has side effects and parameters of its own, so that path runs
through autograd instead, on the same packed MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from .activations import activate, activation_backward, dice
from .op_args import (AttentionArgs, InputGrads, JaggedAttentionArgs, fake_input_grads,
                      op_schema, save_arguments, saved_arguments)
from .problem import DINProblem, JaggedDINProblem, compute_dtype, split_first_layer
from .reference import masked_normalize


class PackedPositions:
    """The valid (row, position) pairs of a padded batch, in row-major order.

    ``rows``/``cols`` are None when every position is kept: then packing is a
    free reshape instead of a gather. That is the case when every position is
    valid, and with ``pack=False``, which keeps the padding too: the layout
    torch.compile can trace (the size of nonzero() depends on the data).
    ``kept_valid`` [B*T] then marks the valid ones among the kept positions;
    it is None when all kept positions are valid.
    """

    def __init__(self, problem: DINProblem, pack: bool = True):
        self.batch, self.length = problem.keys.shape[:2]
        self.valid = problem.valid_mask()
        self.without_padding = problem.without_padding
        self.kept_valid = None
        if problem.lengths is None and problem.mask is None:
            self.rows = self.cols = None
        elif not pack:
            self.rows = self.cols = None
            self.kept_valid = self.valid.reshape(-1)
        else:
            self.rows, self.cols = self.valid.nonzero(as_tuple=True)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...], kept padding positions zeroed."""
        if self.rows is None:
            dense = self.without_padding(dense)
            return dense.reshape(self.batch * self.length, *dense.shape[2:])
        return dense[self.rows, self.cols]

    def gather_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-position scores or weights, [B, C, T] -> [N, C]."""
        return self.gather(scores.transpose(1, 2))

    def scatter(self, packed: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...] with zeros at the invalid positions."""
        shape = (self.batch, self.length, *packed.shape[1:])
        if self.rows is None:
            return packed.reshape(shape)
        return packed.new_zeros(shape).index_put_((self.rows, self.cols), packed)

    def expand_rows(self, per_row: torch.Tensor) -> torch.Tensor:
        """[B, ...] -> [N, ...]: each position gets its row's value."""
        if self.rows is None:
            return per_row.repeat_interleave(self.length, dim=0)
        return per_row[self.rows]

    def sum_rows(self, packed: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, ...]: the sum over each row's positions."""
        if self.rows is None:
            return packed.view(self.batch, self.length, *packed.shape[1:]).sum(1)
        return packed.new_zeros(self.batch, *packed.shape[1:]).index_add_(0, self.rows, packed)


class JaggedPositions(PackedPositions):
    """The positions of a jagged batch, packed already: [L, ...] tensors are
    their own packed form, so gather and scatter are the identity; a row's
    positions are found through the row id of each."""

    def __init__(self, problem: JaggedDINProblem):
        self.batch = problem.offsets.shape[0] - 1
        self.rows = problem.row_ids()
        self.kept_valid = None

    def gather(self, jagged: torch.Tensor) -> torch.Tensor:
        return jagged

    gather_scores = scatter = gather


@dataclass
class PackedMLP:
    """The activation unit's layers, cast to the compute dtype; ``act_params``
    per hidden layer as in DINProblem."""

    weights: list
    biases: list
    act_params: list
    activation: str
    dice_eps: float

    @classmethod
    def of(cls, problem, dtype: torch.dtype, act_params=None):
        act_params = problem.act_params if act_params is None else act_params
        return cls([w.to(dtype) for w in problem.weights], [b.to(dtype) for b in problem.biases],
                   [tuple(p.to(dtype) for p in layer) for layer in act_params],
                   problem.activation, problem.dice_eps)


def packed_scores(mlp: PackedMLP, query: torch.Tensor, k_packed: torch.Tensor, expand_rows,
                  dice_gate=None, preacts: Optional[list] = None) -> torch.Tensor:
    """Raw scores s [N, C] of packed history positions.

    ``query`` [B, C, D] and ``k_packed`` [N, D] in the compute dtype;
    ``expand_rows`` maps a per-row tensor [B, ...] to its positions [N, ...].
    ``dice_gate(layer, x)``, when given, returns the logits of Dice's gate for
    the pre-activations x [N, C, H] of hidden layer ``layer`` in place of
    (x - mu) / sqrt(var + eps) (torch_din_attention documents its signature).
    ``preacts``, when a list, receives every hidden layer's pre-activation
    (what the hand-written backward keeps).
    """
    w_q, w_k, w_d, w_p = split_first_layer(mlp.weights[0])
    h = expand_rows(query @ (w_q + w_d).t() + mlp.biases[0])           # [N, C, H1]
    h += (k_packed @ (w_k - w_d).t())[:, None, :]
    qk = expand_rows(query) * k_packed[:, None, :]                      # [N, C, D]
    if torch.is_grad_enabled() or torch.compiler.is_compiling() \
            or torch._C._functorch.is_functorch_wrapped_tensor(h):
        # Autograd and vmap: out of place (vmap has no batching rule for addmm_);
        # a trace too, which cannot call the functorch check.
        h = torch.addmm(h.flatten(0, 1), qk.flatten(0, 1), w_p.t()).view_as(h)
    else:
        # Under the hand-written backward: in place, one [N, C, H1] buffer.
        h.flatten(0, 1).addmm_(qk.flatten(0, 1), w_p.t())
    del qk
    layers = zip(mlp.weights[1:], mlp.biases[1:], mlp.act_params)
    for i, (w, b, params) in enumerate(layers):
        if preacts is not None:
            preacts.append(h)
        if dice_gate is not None:
            h = dice(h, params[0], dice_gate(i, h))
        else:
            h = activate(h, mlp.activation, params, mlp.dice_eps)
        h = torch.addmm(b, h.flatten(0, 1), w.t()).view(*h.shape[:2], w.shape[0])
    return h.squeeze(-1)


def _sum_candidates(x: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] -> [N, ...]; with one candidate a view, not a reduction
    (which would fill and copy a tensor of the keys' size)."""
    return x.squeeze(1) if x.shape[1] == 1 else x.sum(1)


def packed_backward(mlp: PackedMLP, packed: PackedPositions, query, keys, values, w, preacts,
                    grad_pooled, grad_w, normalization, scale, values_are_keys):
    """The chain rule of the padded forward, written out on the packed positions.

    ``packed`` is a PackedPositions or a JaggedPositions, and ``w`` the
    forward's attention weights in its layout ([B, C, T] padded, [L, C]
    jagged), as ``grad_w`` if given; ``preacts`` are the forward's hidden
    pre-activations. Returns (d query, d keys, d values or None when
    the values are the keys, d weights, d biases, d act_params per layer).
    """
    n_layers = len(mlp.act_params)
    # Pooling and normalization, on the packed positions only: dL/dv, dL/dw,
    # then dL/ds.
    k_packed = packed.gather(keys)                                       # [N, D]
    v_packed = k_packed if values_are_keys else packed.gather(values)    # [N, Dv]
    w_packed = packed.gather_scores(w)                                   # [N, C]
    grad_out = packed.expand_rows(grad_pooled)                           # [N, C, Dv]
    grad_v_packed = _sum_candidates(w_packed[..., None] * grad_out)      # [N, Dv]
    grad_s = (grad_out * v_packed[:, None, :]).sum(-1)                   # [N, C]
    del grad_out, v_packed
    if grad_w is not None:
        grad_s += packed.gather_scores(grad_w)
    if normalization == "softmax":
        row_dot = packed.sum_rows(w_packed * grad_s)                      # [B, C]
        grad_s = w_packed * (grad_s - packed.expand_rows(row_dot))
    grad_next = (grad_s * scale)[..., None]                              # [N, C, 1]
    del grad_s, w_packed

    # The MLP, last layer first: grad_next is dL/d(pre-activation) of the
    # layer that consumes layer i's output; activations are recomputed.
    grad_weights = [None] * (n_layers + 1)
    grad_biases = [None] * (n_layers + 1)
    grad_params = [None] * n_layers
    for i in reversed(range(n_layers)):
        grad_h = grad_next @ mlp.weights[i + 1]
        z, params = preacts[i], mlp.act_params[i]
        h = activate(z, mlp.activation, params, mlp.dice_eps)
        grad_weights[i + 1] = grad_next.flatten(0, 1).t() @ h.flatten(0, 1)
        grad_biases[i + 1] = grad_next.sum((0, 1))
        grad_next, grad_params[i] = activation_backward(z, grad_h, mlp.activation, params,
                                                        mlp.dice_eps, output=h)
        del grad_h, h
    grad_z = grad_next                                                   # [N, C, H1]
    del grad_next

    # The folded first layer: z1 = (W_q + W_d) q + (W_k - W_d) k + W_p (q*k) + b_1.
    w_q, w_k, w_d, w_p = split_first_layer(mlp.weights[0])
    q_packed = packed.expand_rows(query)                                 # [N, C, D]
    grad_u = packed.sum_rows(grad_z)                                     # [B, C, H1]
    grad_z_keys = _sum_candidates(grad_z)                                # [N, H1]
    grad_fold_q = grad_u.flatten(0, 1).t() @ query.flatten(0, 1)        # d(W_q + W_d)
    grad_fold_k = grad_z_keys.t() @ k_packed                             # d(W_k - W_d)
    grad_w_p = grad_z.flatten(0, 1).t() @ (q_packed * k_packed[:, None, :]).flatten(0, 1)
    grad_weights[0] = torch.cat(
        [grad_fold_q, grad_fold_k, grad_fold_q - grad_fold_k, grad_w_p], dim=1)
    grad_biases[0] = grad_u.sum((0, 1))
    grad_qk = grad_z @ w_p                                               # [N, C, D]
    del grad_z
    grad_query = grad_u @ (w_q + w_d) + packed.sum_rows(grad_qk * k_packed[:, None, :])
    del k_packed
    grad_k_packed = _sum_candidates(grad_qk * q_packed).addmm_(grad_z_keys, w_k - w_d)
    del grad_qk, q_packed, grad_z_keys
    if values_are_keys:
        grad_keys, grad_values = packed.scatter(grad_k_packed.add_(grad_v_packed)), None
    else:
        grad_keys, grad_values = packed.scatter(grad_k_packed), packed.scatter(grad_v_packed)
    return grad_query, grad_keys, grad_values, grad_weights, grad_biases, grad_params


def _padded_forward(mlp, packed, query, keys, values, normalization, scale, preacts=None,
                    dice_gate=None):
    """(pooled [B, C, Dv], w [B, C, T]) of a padded batch."""
    scores = packed_scores(mlp, query, packed.gather(keys), packed.expand_rows, dice_gate,
                           preacts)
    dense = packed.scatter(scores).transpose(1, 2)                        # [B, C, T]
    w = masked_normalize(dense, packed.valid, normalization, scale)
    # w is 0 at the padding, but 0 * NaN is not: the padding never reaches the sum.
    return w @ packed.without_padding(values), w


def _inputs(problem, dtype):
    """(query, history, values) of a DINProblem or a JaggedDINProblem, in ``dtype``."""
    keys = getattr(problem, problem.HISTORY).to(dtype)
    values = keys if problem.values is None else problem.values.to(dtype)
    return problem.query.to(dtype), keys, values


def _autograd_forward(problem: DINProblem, packed: PackedPositions, dice_gate=None):
    """(pooled, w) of a padded problem through autograd alone, on the positions
    ``packed`` keeps; ``dice_gate`` as in torch_din_attention."""
    dtype = problem.compute_dtype()
    query, keys, values = _inputs(problem, dtype)
    gate = None
    act_params = None
    if dice_gate is not None:
        # The gate's statistics are Dice's mu and var: only a is a parameter here.
        act_params = [layer[:1] for layer in problem.act_params]
        gate = lambda i, x: dice_gate(i, x, packed.kept_valid)  # noqa: E731
    mlp = PackedMLP.of(problem, dtype, act_params)
    return _padded_forward(mlp, packed, query, keys, values, problem.normalization,
                           problem.scale, dice_gate=gate)


def torch_din_attention(problem: DINProblem, dice_gate=None):
    """Returns (pooled [B, C, Dv], weights w [B, C, T]) in the compute dtype.

    The fast path: the MLP on the valid positions only (packed, a
    data-dependent size) with the hand-written backward, as the opaque op
    din_fast::torch_attention_forward, so that torch.compile keeps it whole
    instead of tracing a graph that scores the padding.
    ``dice_gate(layer, x, valid)`` replaces Dice's normalization (see
    packed_scores) and runs through autograd instead, packed in eager mode and
    on every position while tracing. ``valid`` [N] bool marks the positions of
    x that are valid, or is None when all are: packed, x holds the valid
    positions only; unpacked it holds the padding too, so statistics must be
    masked.
    """
    if dice_gate is not None:
        packed = PackedPositions(problem, pack=not torch.compiler.is_compiling())
        return _autograd_forward(problem, packed, dice_gate)
    pooled, w, _ = forward_op(*AttentionArgs.of(problem))
    return pooled, w


def differentiable_din_attention(problem, dice_gate=None):
    """(pooled [B, C, Dv], w) in the compute dtype, for a DINProblem or a
    JaggedDINProblem, through autograd alone and with no data-dependent size:
    every position is scored, the padding zeroed first. What torch.compile,
    torch.func transforms (vmap, jvp, grad), forward-mode AD and double
    backward run on; ``dice_gate`` as in torch_din_attention.
    """
    if isinstance(problem, JaggedDINProblem):
        return torch_din_attention_jagged(problem)
    return _autograd_forward(problem, PackedPositions(problem, pack=False), dice_gate)


def autograd_gradients(problem, grad_pooled: torch.Tensor,
                       grad_scores: Optional[torch.Tensor] = None) -> list:
    """The gradients of problem.float_tensors() (None for those that need
    none) from d loss / d pooled and d loss / d w, recomputed through
    differentiable_din_attention with create_graph: a graph double backward
    can differentiate.

    Each argument gets a node of its own (a view), so that a tensor passed in
    two places (values=keys) gets its two gradients apart, as a backward
    must return them.
    """
    tensors = problem.float_tensors()
    slots = [t.view_as(t) if t.requires_grad else t for t in tensors]
    with torch.enable_grad():
        pooled, w = differentiable_din_attention(problem.with_float_tensors(slots))
    outputs, seeds = [pooled], [grad_pooled.to(pooled.dtype)]
    if grad_scores is not None:
        outputs.append(w)
        seeds.append(grad_scores.to(w.dtype))
    wanted = [i for i, t in enumerate(slots) if t.requires_grad]
    found = torch.autograd.grad(outputs, [slots[i] for i in wanted], seeds, create_graph=True,
                                allow_unused=True)
    grads = [None] * len(slots)
    for i, grad in zip(wanted, found):
        grads[i] = torch.zeros_like(slots[i]) if grad is None else grad
    return grads


def _jagged_forward(mlp, positions, query, keys_values, values, normalization, scale,
                    preacts=None):
    """(pooled [B, C, Dv], w [L, C]) of a jagged batch.

    The jagged values are the packed positions already: the MLP runs on them
    as they are, and the normalization and the weighted sum reduce per
    segment, so nothing of size [B, max_len, ...] is ever built.
    """
    batch, candidates = query.shape[:2]
    rows = positions.rows
    scores = packed_scores(mlp, query, keys_values, positions.expand_rows, preacts=preacts)
    scores = scores * scale
    if normalization == "softmax":
        # Per-segment softmax; the max only stabilizes, so it carries no gradient.
        # Empty segments have no entries and so pool to zero, never NaN.
        index = rows[:, None].expand(-1, candidates)
        with torch.no_grad():
            seg_max = scores.new_full((batch, candidates), float("-inf"))
            seg_max = seg_max.scatter_reduce(0, index, scores, "amax")
        exp = torch.exp(scores - seg_max[rows])
        denom = exp.new_zeros(batch, candidates).index_add(0, rows, exp)
        scores = exp / denom[rows]
    pooled = values.new_zeros(batch, candidates, values.shape[1])
    pooled = pooled.index_add(0, rows, scores[:, :, None] * values[:, None, :])
    return pooled, scores


def torch_din_attention_jagged(problem: JaggedDINProblem):
    """Returns (pooled [B, C, Dv], weights w [L, C]) in the compute dtype,
    differentiable through autograd (which torch.compile traces as it is)."""
    dtype = problem.compute_dtype()
    query, keys_values, values = _inputs(problem, dtype)
    return _jagged_forward(PackedMLP.of(problem, dtype), JaggedPositions(problem), query,
                           keys_values, values, problem.normalization, problem.scale)


def torch_din_attention_backward(problem, grad_pooled: torch.Tensor,
                                 grad_scores: Optional[torch.Tensor] = None, saved=()):
    """The gradients of every input from d loss / d pooled [B, C, Dv] (and
    d loss / d w, [B, C, T] padded or [L, C] jagged): the custom ops' backward
    on the torch backend, for a DINProblem or a JaggedDINProblem.

    The ops run below autograd: ``saved`` holds what the forward op kept
    (w, then the hidden pre-activations) or is empty, and then the forward is
    recomputed; ``packed_backward`` does the rest. Returns (dq, d history,
    dv or None, dweights, dbiases, dact_params per layer), each in its input's
    dtype, as din_fast.kernels.din_backward.din_backward does.
    """
    dtype = problem.compute_dtype()
    query, keys, values = _inputs(problem, dtype)
    mlp = PackedMLP.of(problem, dtype)
    if isinstance(problem, JaggedDINProblem):
        packed = JaggedPositions(problem)
        forward = _jagged_forward
    else:
        packed = PackedPositions(problem)
        forward = _padded_forward
    if saved:
        w, *preacts = saved
    else:
        preacts = []
        _, w = forward(mlp, packed, query, keys, values, problem.normalization,
                       problem.scale, preacts)
    dq, dk, dv, dweights, dbiases, dact = packed_backward(
        mlp, packed, query, keys, values, w, preacts, grad_pooled.to(dtype),
        None if grad_scores is None else grad_scores.to(dtype), problem.normalization,
        problem.scale, values_are_keys=problem.values is None)
    return (
        dq.to(problem.query.dtype), dk.to(getattr(problem, problem.HISTORY).dtype),
        None if dv is None else dv.to(problem.values.dtype),
        [d.to(t.dtype) for d, t in zip(dweights, problem.weights)],
        [d.to(t.dtype) for d, t in zip(dbiases, problem.biases)],
        [tuple(d.to(p.dtype) for d, p in zip(grads, params))
         for grads, params in zip(dact, problem.act_params)],
    )


def run(problem, dice_gate=None):
    """(pooled [B, C, Dv], w) in the compute dtype of a DINProblem (w [B, C, T]):
    the packed path, or differentiable_din_attention where a transform or an
    export needs a graph of aten ops alone (torch.func, forward-mode AD,
    torch.export, whose package runs without Python); of a JaggedDINProblem
    (w [L, C]) the jagged path, which is such a graph already."""
    if isinstance(problem, JaggedDINProblem):
        return torch_din_attention_jagged(problem)
    if problem.differentiated_forward() or torch.compiler.is_exporting():
        return differentiable_din_attention(problem, dice_gate)
    return torch_din_attention(problem, dice_gate)


def reverse_gradients(problem, grad_pooled: Tensor, grad_scores: Optional[Tensor],
                      backward) -> List[Tensor]:
    """InputGrads.flat() of a forward op's autograd formula (on either
    backend): ``backward()``, a backward op, or under create_graph=True, where
    the gradients must be differentiable themselves, autograd_gradients
    (which double backward can differentiate)."""
    if not torch.is_grad_enabled():
        return backward()
    flat = autograd_gradients(problem, grad_pooled, grad_scores)
    if problem.values is None:
        flat.insert(2, None)
    return flat


# The packed forward and the hand-written backward as opaque custom ops:
# torch.compile must not trace them (the packing has a data-dependent size),
# and keeps eager's fast path by calling them whole. The backward ops also
# serve the triton backend's autograd formula where its fused backward does
# not reach.

def _forward_op(*inputs):
    """(pooled, w, the hidden pre-activations [N, C, H_i] of the N valid
    positions) of AttentionArgs, in the compute dtype."""
    problem = AttentionArgs(*inputs).problem()
    dtype = problem.compute_dtype()
    query, keys, values = _inputs(problem, dtype)
    preacts = []
    with torch.no_grad():   # below autograd: packed_scores may work in place
        pooled, w = _padded_forward(PackedMLP.of(problem, dtype), PackedPositions(problem),
                                    query, keys, values, problem.normalization,
                                    problem.scale, preacts)
    # Contiguous, as the fake promises (w is a transposed scatter).
    return pooled.contiguous(), w.contiguous(), [z.contiguous() for z in preacts]


def _forward_fake(query, keys, values, lengths, mask, weights, *options):
    dtype = compute_dtype(keys.dtype)
    batch, candidates = query.shape[:2]
    positions = torch.library.get_ctx().new_dynamic_size()   # how many are valid
    value_dim = (keys if values is None else values).shape[-1]
    return (query.new_empty(batch, candidates, value_dim, dtype=dtype),
            query.new_empty(batch, candidates, keys.shape[1], dtype=dtype),
            [query.new_empty(positions, candidates, w.shape[0], dtype=dtype)
             for w in weights[:-1]])


def _forward_setup_context(ctx, inputs, output):
    _, w, preacts = output
    save_arguments(ctx, AttentionArgs(*inputs), w, *preacts)
    ctx.mark_non_differentiable(*preacts)
    # No zeros for the pre-activations' gradients (nor for the scores' when
    # they are not used): the backward takes None.
    ctx.set_materialize_grads(False)


def _forward_backward(ctx, grad_pooled, grad_scores, _):
    args, saved = saved_arguments(ctx)
    problem = args.problem()
    if grad_pooled is None:    # only the scores were used
        grad_pooled = saved[0].new_zeros(*saved[0].shape[:2],
                                         problem.value_tensor.shape[-1])
    flat = reverse_gradients(problem, grad_pooled, grad_scores,
                             lambda: backward_op(grad_pooled, grad_scores, saved, *args))
    return InputGrads.unflat(flat, len(args.weights)).as_inputs(AttentionArgs,
                                                                problem.values is not None)


forward_op = torch.library.custom_op(
    "din_fast::torch_attention_forward", _forward_op, mutates_args=(),
    schema=op_schema(AttentionArgs, returns="(Tensor, Tensor, Tensor[])"))
forward_op.register_fake(_forward_fake)
forward_op.register_autograd(_forward_backward, setup_context=_forward_setup_context)


def _backward_op_for(fields: type):
    """The op function of ``fields``' backward: (grad_pooled, grad_scores,
    saved, the forward's arguments) -> InputGrads.flat()."""
    def backward(grad_pooled, grad_scores, saved, *inputs):
        args = fields(*inputs)
        grads = torch_din_attention_backward(args.problem(), grad_pooled, grad_scores, saved)
        return InputGrads.of(grads, inputs[1]).flat()
    return backward


def _backward_fake(grad_pooled, grad_scores, saved, *inputs):
    return fake_input_grads(grad_pooled, grad_scores, *inputs)


BACKWARD_LEADING = ("Tensor grad_pooled", "Tensor? grad_scores", "Tensor[] saved")
backward_op = torch.library.custom_op(
    "din_fast::torch_attention_backward", _backward_op_for(AttentionArgs), mutates_args=(),
    schema=op_schema(AttentionArgs, returns="Tensor[]", leading=BACKWARD_LEADING))
backward_op.register_fake(_backward_fake)
jagged_backward_op = torch.library.custom_op(
    "din_fast::torch_attention_jagged_backward", _backward_op_for(JaggedAttentionArgs),
    mutates_args=(),
    schema=op_schema(JaggedAttentionArgs, returns="Tensor[]", leading=BACKWARD_LEADING))
jagged_backward_op.register_fake(_backward_fake)


def torch_attention_backward(problem, grad_pooled: Tensor,
                             grad_scores: Optional[Tensor]) -> List[Tensor]:
    """InputGrads.flat() of a DINProblem or a JaggedDINProblem through the
    backward ops above, the forward recomputed."""
    if isinstance(problem, JaggedDINProblem):
        return jagged_backward_op(grad_pooled, grad_scores, [],
                                  *JaggedAttentionArgs.of(problem))
    return backward_op(grad_pooled, grad_scores, [], *AttentionArgs.of(problem))
