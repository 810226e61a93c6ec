"""The fast pure-PyTorch backend: the CPU default and the fallback everywhere.

Its forward and backward (din_fast.chunked) walk the (row, candidate,
position) triples in blocks sized to a working-set budget
(din_fast.chunking), so memory never grows with B * C * T:
- the first layer is folded per candidate (din_fast.activation_unit):
  W_1 [q, k, q-k, q*k] + b_1 = u + M k with M = (W_k - W_d) + W_p diag(q),
  so a block's first layer is one matrix product of its keys with the
  stacked M of its candidates, and the deeper layers plain products, never
  building the [.., T, 4D] concat; where histories are too short for M to
  pay for itself, it stays shared instead: (W_k - W_d) k per position plus
  W_p (q * k) per pair, one product over all of a block's pairs;
- the rows are taken longest first and grouped, each group padded to its
  longest row: padding costs little, and masked slots never reach a result;
- the forward keeps per (row, candidate) only the pooled output and, for
  softmax, the max and the normalizer (an online softmax, as FlashAttention);
  the backward is written by hand. For a call that autograd will
  differentiate, the forward also keeps each block's scores and hidden
  activations where their upper bound fits chunking.kept_activations_bytes
  (64 MiB, or DIN_FAST_KEEP_ACTIVATIONS_MB): the backward reads them
  instead of recomputing them, about 1.3x faster at the training shape;
  beyond the budget, and for inference, nothing per pair is kept.

Forward and backward are opaque custom ops (din_fast::torch_attention_forward,
din_fast::torch_attention_jagged_forward and their backward ops, at the end
of this file), so that torch.compile calls them whole, with the same speed
as eager mode, instead of tracing a graph of aten ops (which could not
block by the lengths: they are data). The backward ops also serve the triton
backend's autograd formula wherever its fused backward does not reach.

Where a graph of aten ops is needed (torch.func transforms, forward-mode AD,
double backward), ``differentiable_din_attention`` runs the MLP through
autograd on every position (memory B * C * T * H). torch.export, whose
graph must also run without Python (an AOTInductor package), traces
``exported_din_attention`` instead: the blocked ops' own arithmetic (the
folded first layer: one product of the keys with the stacked M of the
candidates, per row) over the whole padded problem as a single block, with
the padding zeroed and masked, since a traced graph cannot follow the
lengths (data) into blocks; its memory is B * C * T * H too. A Dice gate
hook (``dice_gate``: batch statistics in training, the peers' BatchNorm)
needs every pre-activation of a layer before any is activated, and has side
effects and parameters of its own, so that path runs through autograd too,
on the valid positions packed.
"""

from __future__ import annotations

import threading
from typing import List, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import chunked, chunking
from .activation_unit import ActivationUnit, FoldedFirstLayer
from .op_args import (AttentionArgs, InputGrads, JaggedAttentionArgs, fake_input_grads,
                      op_schema, save_arguments, saved_arguments)
from .problem import DINProblem, JaggedDINProblem, compute_dtype
from .reference import masked_normalize


def take_rows(per_row: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``per_row[rows]``: [B, ...] -> [len(rows), ...], rows repeated or not.

    By index_select, whose backward sums the repeats in a fixed order: that
    of ``per_row[rows]`` (index_put_ with accumulate) adds them with atomic
    adds across torch's CPU threads, so on more than one thread the same
    batch gave other gradients from run to run, and the same seed trained
    another model.
    """
    return per_row.index_select(0, rows)


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
        flat = dense.reshape(self.batch * self.length, *dense.shape[2:])
        return take_rows(flat, self.rows * self.length + self.cols)

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
        return take_rows(per_row, self.rows)


def packed_scores(unit: ActivationUnit, query: torch.Tensor, k_packed: torch.Tensor,
                  expand_rows, dice_gate=None) -> torch.Tensor:
    """Raw scores s [N, C] of packed history positions, through autograd: the
    activation unit's shared first layer (one product over the positions,
    one over the pairs; the blocks' fold needs per-row matrices a transform
    would have to batch) and its deeper layers.

    ``query`` [B, C, D] and ``k_packed`` [N, D] in the compute dtype;
    ``expand_rows`` maps a per-row tensor [B, ...] to its positions [N, ...].
    ``dice_gate(layer, x)``, when given, returns the logits of Dice's gate for
    the pre-activations x [N, C, H] of hidden layer ``layer`` in place of
    (x - mu) / sqrt(var + eps) (torch_din_attention documents its signature).
    """
    z = unit.first_layer(k_packed, expand_rows(query), expand_rows(unit.query_term(query)))
    return unit.hidden_layers(z, dice_gate=dice_gate)


def _padded_forward(unit, packed, query, keys, values, normalization, scale, dice_gate=None):
    """(pooled [B, C, Dv], w [B, C, T]) of a padded batch."""
    scores = packed_scores(unit, query, packed.gather(keys), packed.expand_rows, dice_gate)
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
    unit = ActivationUnit(problem, dtype, act_params)
    return _padded_forward(unit, packed, query, keys, values, problem.normalization,
                           problem.scale, dice_gate=gate)


def torch_din_attention(problem: DINProblem, dice_gate=None, need_scores: bool = True):
    """Returns (pooled [B, C, Dv], weights w [B, C, T] or None without
    ``need_scores``) in the compute dtype.

    The fast path: din_fast.chunked's blocks, in bounded memory, as the
    opaque op din_fast::torch_attention_forward, so that torch.compile keeps
    it whole instead of tracing a graph that scores the padding.
    ``dice_gate(layer, x, valid)`` replaces Dice's normalization (see
    packed_scores) and runs through autograd instead (its batch statistics
    need every pre-activation of a layer before any is activated), packed in
    eager mode and on every position while tracing. ``valid`` [N] bool marks
    the positions of x that are valid, or is None when all are: packed, x
    holds the valid positions only; unpacked it holds the padding too, so
    statistics must be masked.
    """
    if dice_gate is not None:
        # Packing takes nonzero(), whose size is data: not while tracing, nor
        # on fake or meta tensors (a FakeTensorMode run, a meta-device model).
        keys = problem.keys
        shapes_only = torch.compiler.is_compiling() or is_fake(keys) or keys.is_meta
        packed = PackedPositions(problem, pack=not shapes_only)
        return _autograd_forward(problem, packed, dice_gate)
    args = AttentionArgs.of(problem)
    pooled, w, *_ = forward_op(*args, need_scores, _keeps_activations(problem, args))
    return pooled, (w if need_scores else None)


def torch_din_attention_jagged(problem: JaggedDINProblem, need_scores: bool = True):
    """Returns (pooled [B, C, Dv], weights w [L, C] or None) in the compute
    dtype: din_fast.chunked's blocks as the opaque op
    din_fast::torch_attention_jagged_forward."""
    args = JaggedAttentionArgs.of(problem)
    pooled, w, *_ = jagged_forward_op(*args, need_scores, _keeps_activations(problem, args))
    return pooled, (w if need_scores else None)


def kept_elements(args, element_size: int) -> int:
    """The size of the forward ops' kept activations, from the shapes alone
    (chunking.kept_bound), the rows padded to T (to max_len for a jagged batch)."""
    batch, candidates = args.query.shape[:2]
    length = (args.max_len if isinstance(args, JaggedAttentionArgs)
              else args.keys.shape[1])
    widths = chunking.kept_widths([w.shape[0] for w in args.weights[:-1]], args.activation)
    return chunking.kept_bound(batch, candidates, length, widths, element_size)


def _keeps_activations(problem, args) -> bool:
    """Whether the forward op keeps the activations for the backward: for a
    call autograd will differentiate (grad enabled, an input that requires
    it), where they fit chunking.kept_activations_bytes."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in problem.float_tensors())):
        return False
    element_size = problem.compute_dtype().itemsize
    nbytes = kept_elements(args, element_size) * element_size
    return 0 < nbytes <= chunking.kept_activations_bytes()


def differentiable_din_attention(problem, dice_gate=None):
    """(pooled [B, C, Dv], w) in the compute dtype, for a DINProblem or a
    JaggedDINProblem, through autograd alone and with no data-dependent size:
    every position is scored, the padding zeroed first (jagged histories
    have none). What torch.func transforms (vmap, jvp, grad), forward-mode
    AD and double backward run on, and torch.export with a Dice gate or a
    jagged history (exported_din_attention); ``dice_gate`` as in
    torch_din_attention. Its memory grows with B * C * T * H, unlike the
    blocked ops'.
    """
    dtype = problem.compute_dtype()
    if isinstance(problem, JaggedDINProblem):
        query, keys_values, values = _inputs(problem, dtype)
        return _jagged_forward(ActivationUnit(problem, dtype), problem.row_ids(), query,
                               keys_values, values, problem.normalization, problem.scale)
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


def _jagged_forward(unit, rows, query, keys_values, values, normalization, scale):
    """(pooled [B, C, Dv], w [L, C]) of a jagged batch through autograd;
    ``rows`` [L] the row of each position.

    The jagged values are the packed positions already: the MLP runs on them
    as they are, and the normalization and the weighted sum reduce per
    segment, so nothing of size [B, max_len, ...] is ever built.
    """
    batch, candidates = query.shape[:2]
    scores = packed_scores(unit, query, keys_values, lambda per_row: take_rows(per_row, rows))
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
        scores = exp / take_rows(denom, rows)
    pooled = values.new_zeros(batch, candidates, values.shape[1])
    pooled = pooled.index_add(0, rows, scores[:, :, None] * values[:, None, :])
    return pooled, scores


def exported_din_attention(problem, dice_gate=None):
    """(pooled [B, C, Dv], w) in the compute dtype, as torch.export traces
    it: a padded problem through din_fast.activation_unit on every position at
    once (the padding zeroed, then masked out of the weights), the first
    layer one product per row of the keys [T, D] with the folded M of its C
    candidates [D, C * H1]. That is the blocked ops' arithmetic, so the
    compiled package scores as fast as eager mode does per pair, where the
    autograd path (differentiable_din_attention) builds q * k [B, T, C, D]
    and runs two first-layer products per pair. A Dice gate hook or a jagged
    problem takes differentiable_din_attention."""
    if dice_gate is not None or isinstance(problem, JaggedDINProblem):
        return differentiable_din_attention(problem, dice_gate)
    dtype = problem.compute_dtype()
    query, keys, values = _inputs(problem, dtype)
    unit = ActivationUnit(problem, dtype)
    scores = unit.scores(problem.without_padding(keys), FoldedFirstLayer(unit, query))  # [B, T, C]
    w = masked_normalize(scores.transpose(1, 2), problem.valid_mask(), problem.normalization,
                         problem.scale)
    # w is 0 at the padding, but 0 * NaN is not: the padding never reaches the sum.
    return w @ problem.without_padding(values), w


def run(problem, dice_gate=None, need_scores: bool = True):
    """(pooled [B, C, Dv], w or None without ``need_scores``) in the compute
    dtype of a DINProblem (w [B, C, T]) or a JaggedDINProblem (w [L, C]):
    the blocked ops, differentiable_din_attention where a transform needs a
    graph of aten ops alone (torch.func, forward-mode AD), or
    exported_din_attention under torch.export (whose package runs without
    Python)."""
    if problem.differentiated_forward():
        return differentiable_din_attention(problem, dice_gate)
    if torch.compiler.is_exporting():
        return exported_din_attention(problem, dice_gate)
    if isinstance(problem, JaggedDINProblem):
        return torch_din_attention_jagged(problem, need_scores)
    return torch_din_attention(problem, dice_gate, need_scores)


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


# The blocked forward and backward as opaque custom ops: torch.compile must
# not trace them (their blocks follow the lengths, data), and keeps eager's
# fast path by calling them whole. The backward ops also serve the triton
# backend's autograd formula where its fused backward does not reach.

class _SpareStorage:
    """CPU storage for the kept activations, handed out again once no tensor
    uses it.

    A new buffer of tens of MB comes from the C allocator freshly mapped
    (glibc maps anything over 32 MB) and freed back to the system, and each
    4 KiB page faults on its first write: at the training shape (50 MB) some
    15 ms of a 100 ms step, most of what keeping the activations saves. So
    the storages stay here after their backward, at most
    chunking.kept_activations_bytes in all, and the next forward that needs
    one of the same size takes it once nothing else holds it (its use
    count, as inductor's CUDA graph trees read it). CUDA's caching
    allocator does as much by itself.
    """

    def __init__(self):
        self.storages: List[torch.UntypedStorage] = []
        self.lock = threading.Lock()

    def tensor(self, like: Tensor, size: int, dtype: torch.dtype) -> Tensor:
        """A flat tensor of ``size`` elements of ``dtype`` on ``like``'s device, uninitialized."""
        if like.device.type != "cpu" or size == 0:
            return like.new_empty(size, dtype=dtype)
        nbytes = size * dtype.itemsize
        with self.lock:
            storage = next((s for s in self.storages
                            if s.nbytes() == nbytes and self._unused(s)), None)
            if storage is None:
                storage = torch.UntypedStorage(nbytes)
                # Room for it: the unused ones of other sizes go.
                self.storages = [s for s in self.storages if not self._unused(s)]
                held = sum(s.nbytes() for s in self.storages)
                if held + nbytes <= chunking.kept_activations_bytes():
                    self.storages.append(storage)
            return torch.empty(0, dtype=dtype, device=like.device).set_(storage, 0, (size,), (1,))

    @staticmethod
    def _unused(storage: torch.UntypedStorage) -> bool:
        return torch._C._storage_Use_Count(storage._cdata) == 1


_spare = _SpareStorage()


def _forward_for(fields: type):
    """The op function of ``fields``' forward: (the arguments, need_scores,
    keep_activations) -> (pooled, w or an empty tensor, row_max and row_sum
    for softmax or empty tensors, the kept activations (kept_elements of
    them) or an empty tensor), in the compute dtype, contiguous, as the fake
    promises."""
    def forward(*inputs):
        *args, need_scores, keep = inputs
        args = fields(*args)
        problem = args.problem()
        dtype = problem.compute_dtype()
        # Empty, not zeros: the blocks write their slots and zero only what
        # lies between and after them (chunked.KeptActivations: the output is
        # then the same on every run), so each byte is written once.
        size = kept_elements(args, dtype.itemsize) if keep else 0
        kept = _spare.tensor(problem.query, size, dtype)
        with torch.no_grad():   # below autograd: the blocks work in place
            outputs = chunked.forward(problem, need_scores, kept if keep else None)
        # Outputs may not alias: an empty tensor of its own for each absent one.
        return tuple(problem.query.new_empty(0, dtype=dtype) if t is None
                     else t.contiguous() for t in outputs) + (kept,)
    return forward


def _forward_fake(query, history, values, *rest):
    """The forward ops' fake result (``rest``: the layout arguments, then the
    unit's, then need_scores and keep_activations)."""
    *fields, need_scores, keep = rest
    jagged = history.dim() == 2
    args = (JaggedAttentionArgs if jagged else AttentionArgs)(query, history, values, *fields)
    dtype = compute_dtype(history.dtype)
    batch, candidates = query.shape[:2]
    value_dim = (history if values is None else values).shape[-1]
    scores_shape = ((history.shape[0], candidates) if jagged
                    else (batch, candidates, history.shape[1]))
    stats_shape = (batch, candidates) if args.normalization == "softmax" else (0,)
    return (query.new_empty(batch, candidates, value_dim, dtype=dtype),
            query.new_empty(scores_shape if need_scores else (0,), dtype=dtype),
            query.new_empty(stats_shape, dtype=dtype), query.new_empty(stats_shape, dtype=dtype),
            query.new_empty(kept_elements(args, dtype.itemsize) if keep else 0, dtype=dtype))


def _setup_context_for(fields: type):
    """setup_context of the forward op whose arguments are ``fields``, then
    need_scores and keep_activations."""
    def setup_context(ctx, inputs, output):
        *args, need_scores, _ = inputs
        args = fields(*args)
        pooled, w, row_max, row_sum, kept = output
        # What the backward needs beyond the inputs (chunked.backward's
        # ``saved``): the kept activations (maybe empty), for softmax the
        # statistics (and the weights, for their own gradient's row term).
        saved = [kept]
        if args.normalization == "softmax":
            saved += [pooled, row_max, row_sum] + ([w] if need_scores else [])
        save_arguments(ctx, args, *saved)
        ctx.need_scores = need_scores
        # The kept activations follow the forward's blocks, which follow the working set.
        ctx.working_set = chunking.working_set_bytes(args.query.device)
        ctx.mark_non_differentiable(row_max, row_sum, kept)
        # No zeros for an unused output's gradient: the backward takes None.
        ctx.set_materialize_grads(False)
    return setup_context


def _forward_backward(ctx, grad_pooled, grad_scores, _max, _sum, _kept):
    args, saved = saved_arguments(ctx)
    problem = args.problem()
    if ctx.working_set != chunking.working_set_bytes(args.query.device):
        saved[0] = saved[0][:0]    # other blocks now: recompute the activations
    grad_scores = grad_scores if ctx.need_scores else None
    if grad_pooled is None:    # only the scores were used
        grad_pooled = problem.query.new_zeros(*problem.query.shape[:2],
                                              problem.value_tensor.shape[-1],
                                              dtype=problem.compute_dtype())
    op = jagged_backward_op if isinstance(args, JaggedAttentionArgs) else backward_op
    flat = reverse_gradients(problem, grad_pooled, grad_scores,
                             lambda: op(grad_pooled, grad_scores, saved, *args))
    grads = InputGrads.unflat(flat, len(args.weights))
    return grads.as_inputs(type(args), problem.values is not None, need_scores=None,
                           keep_activations=None)


FORWARD_RETURNS = "(Tensor, Tensor, Tensor, Tensor, Tensor)"
FORWARD_TRAILING = ("bool need_scores", "bool keep_activations")
forward_op = torch.library.custom_op(
    "din_fast::torch_attention_forward", _forward_for(AttentionArgs), mutates_args=(),
    schema=op_schema(AttentionArgs, returns=FORWARD_RETURNS, trailing=FORWARD_TRAILING))
jagged_forward_op = torch.library.custom_op(
    "din_fast::torch_attention_jagged_forward", _forward_for(JaggedAttentionArgs),
    mutates_args=(),
    schema=op_schema(JaggedAttentionArgs, returns=FORWARD_RETURNS, trailing=FORWARD_TRAILING))
for _op, _fields in ((forward_op, AttentionArgs), (jagged_forward_op, JaggedAttentionArgs)):
    _op.register_fake(_forward_fake)
    _op.register_autograd(_forward_backward, setup_context=_setup_context_for(_fields))


def _backward_op_for(fields: type):
    """The op function of ``fields``' backward: (grad_pooled, grad_scores,
    saved, the forward's arguments) -> InputGrads.flat()."""
    def backward(grad_pooled, grad_scores, saved, *inputs):
        args = fields(*inputs)
        with torch.no_grad():
            grads = chunked.backward(args.problem(), grad_pooled, grad_scores, saved)
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
    backward ops above, the forward recomputed where softmax needs it."""
    if isinstance(problem, JaggedDINProblem):
        return jagged_backward_op(grad_pooled, grad_scores, [],
                                  *JaggedAttentionArgs.of(problem))
    return backward_op(grad_pooled, grad_scores, [], *AttentionArgs.of(problem))
