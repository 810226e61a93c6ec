"""The activation unit on pairs of (candidate, position), as matrix products:
the torch backend's arithmetic, in blocks (din_fast.chunked) and through
autograd (din_fast.torch_backend).

With q = query[b, c] and k = keys[b, t], the first layer is
W_1 [q, k, q-k, q*k] + b_1 = u + (W_k - W_d) k + W_p (q * k), where
u = (W_q + W_d) q + b_1 is computed once per candidate. It runs in one of
two forms, the same arithmetic regrouped:

- folded (FoldedFirstLayer): u + M k with M = (W_k - W_d) + W_p diag(q),
  [H1, D] per candidate. Stacking the M of a block's candidates gives one
  [Cc * H1, D] matrix per row, so the first layer of every pair of a row is
  one product keys [span, D] x M^T [D, Cc * H1] (batched over the block's
  rows): one multiply-add per weight and pair, the least a first layer can
  cost, and no [pairs, D] product q * k. Building M costs H1 * D per
  (row, candidate), in element-wise passes, and the product with few
  positions is a matrix-vector one, bound by reading M: worth it where each
  M serves many positions.
- shared (SharedFirstLayer): (W_k - W_d) k once per position, shared by
  the candidates, plus (q * k) W_p^T per pair: one product over all of a
  block's pairs with the weights cache-resident, whatever the lengths.
  Worth it for short histories (chunking.UnitSize.folds decides).

The deeper layers are plain matrix products on [pairs, H]. The backward
(written by hand, for the blocks) runs the same products the other way.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .activations import activate, activation_backward, derivative_needs_input, dice
from .problem import split_first_layer


def _in_place(tensor: Tensor) -> bool:
    """Whether an operation may overwrite ``tensor``: not under autograd, a
    trace or a torch.func transform (vmap has no batching rule for addmm_; a
    trace cannot call the functorch check), which need their inputs kept."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch._C._functorch.is_functorch_wrapped_tensor(tensor))


class ActivationUnit:
    """The activation unit's parameters in the compute dtype, the first layer
    split for the fold; ``act_params`` per hidden layer as in DINProblem
    (``act_params``, when given, in their place: the Dice gate path keeps a
    alone)."""

    def __init__(self, problem, dtype: torch.dtype, act_params=None):
        # Contiguous, whatever the parameters' layout: M and u are views of
        # products of them.
        w_q, w_k, w_d, w_p = split_first_layer(problem.weights[0].to(dtype).contiguous())
        self.w_p = w_p.contiguous()
        self.w_query = w_q + w_d                     # applied to q, once per candidate
        self.w_keys = w_k - w_d                      # the part of M every candidate shares
        self.b_1 = problem.biases[0].to(dtype)
        self.deeper = [(w.to(dtype), b.to(dtype))
                       for w, b in zip(problem.weights[1:], problem.biases[1:])]
        # The transposed views the products take, made once per call rather
        # than once per block (a block is a few dozen small ops: each counts).
        self.w_query_t = self.w_query.t()
        self.deeper_t = [w.t() for w, _ in self.deeper]
        act_params = problem.act_params if act_params is None else act_params
        self.act_params = [tuple(p.to(dtype) for p in layer) for layer in act_params]
        self.activation = problem.activation
        self.dice_eps = problem.dice_eps
        self.hidden = problem.hidden_units
        # The backward keeps each layer's outputs, and its inputs where the
        # derivative needs them.
        self.keeps_inputs = derivative_needs_input(problem.activation)

    def query_term(self, query: Tensor) -> Tensor:
        """u = (W_q + W_d) q + b_1, [..., H1] of query [..., D]."""
        flat = torch.addmm(self.b_1, query.flatten(0, -2), self.w_query_t)
        return flat.view(*query.shape[:-1], self.hidden[0])

    def fold(self, query: Tensor):
        """(u [G, 1, Cc * H1], M [G, Cc * H1, D]) of query [G, Cc, D] (contiguous)."""
        rows, candidates, dim = query.shape
        m = torch.addcmul(self.w_keys, self.w_p, query.unsqueeze(2))
        u = torch.addmm(self.b_1, query.view(rows * candidates, dim), self.w_query_t)
        return u.view(rows, 1, -1), m.view(rows, candidates * self.hidden[0], dim)

    def first_layer(self, keys: Tensor, query: Tensor, u: Tensor,
                    out: Optional[Tensor] = None) -> Tensor:
        """The shared form's pre-activations z [..., C, H1] of keys [..., D]
        against ``query`` [..., C, D] with their ``u`` [..., C, H1] (both
        broadcast against keys [..., 1, D]); written into ``out`` (their
        number of elements, contiguous) where given."""
        # Contiguous operands (a strided window of the history, a transposed
        # query), so that the products are laid out as their views need.
        keys, query = keys.contiguous(), query.contiguous()
        per_position = (keys @ self.w_keys.t()).unsqueeze(-2)
        if out is None:
            z = u + per_position
        else:
            shape = torch.broadcast_shapes(u.shape, per_position.shape)
            z = torch.add(u, per_position, out=out.view(shape))
        products = query * keys.unsqueeze(-2)                            # [..., C, D]
        if _in_place(z):
            z.view(-1, z.shape[-1]).addmm_(products.flatten(0, -2), self.w_p.t())
            return z
        return torch.addmm(z.flatten(0, -2), products.flatten(0, -2), self.w_p.t()).view_as(z)

    def hidden_layers(self, z: Tensor, kept: Optional[List[tuple]] = None,
                      dice_gate=None, into: Optional[tuple] = None) -> Tensor:
        """Raw scores [...] from the first layer's pre-activations z [..., H1].
        ``kept``, when a list, receives per hidden layer (pre-activation or
        None, activation), each [pairs, H], for ``backward``.
        ``dice_gate(layer, x)``, when given, returns the logits of Dice's gate
        for the pre-activations x [..., H] of hidden layer ``layer`` in place
        of (x - mu) / sqrt(var + eps); ``kept`` is not taken with it.
        ``into``, (scores, kept) as ``scores`` takes it, receives every layer
        in place; z must then be pre_activation_slot's of its first layer."""
        shape = z.shape[:-1]
        # Without a gate (which needs the pairs' layout) the layers run on
        # [pairs, H] throughout: no view per layer.
        h = z if dice_gate is not None else z.reshape(-1, z.shape[-1])
        in_place = _in_place(z)
        for layer, (w, b) in enumerate(self.deeper):
            z = h
            if dice_gate is not None:
                h = dice(z, self.act_params[layer][0], dice_gate(layer, z)).flatten(0, -2)
            else:
                h = self._activate(z, layer, in_place)
                if into is not None and (self.keeps_inputs or not in_place):
                    h = into[1][layer][1].copy_(h)     # not activated within its slot
            if kept is not None:
                kept.append((z if self.keeps_inputs else None, h))
            out = None
            if into is not None:
                out = (into[0].view(-1, 1) if layer + 1 == len(self.deeper)
                       else self.pre_activation_slot(into[1][layer + 1]))
            h = torch.addmm(b, h, self.deeper_t[layer], out=out)
            if dice_gate is not None:
                h = h.view(*z.shape[:-1], w.shape[0])
        return h.view(shape)

    def pre_activation_slot(self, layer: tuple) -> Tensor:
        """Where a hidden layer's pre-activation is written, of its (pre-activation
        or None, activation) views: the activation's where the activation
        overwrites it (sigmoid, relu)."""
        return layer[1] if layer[0] is None else layer[0]

    def _activate(self, z: Tensor, layer: int, in_place: bool) -> Tensor:
        """The hidden activation of z [..., H] (in place where ``in_place``,
        _in_place's answer: z is then not needed, its derivative follows
        from the output)."""
        if self.activation in ("sigmoid", "relu") and in_place:
            return z.sigmoid_() if self.activation == "sigmoid" else z.relu_()
        return activate(z, self.activation, self.act_params[layer], self.dice_eps)

    def scores(self, keys: Tensor, first_layer, kept: Optional[List[tuple]] = None,
               into: Optional[tuple] = None) -> Tensor:
        """Raw scores s [G, span, Cc] of keys [G, span, D] against a chunk of
        candidates, ``first_layer`` one of FoldedFirstLayer, SharedFirstLayer;
        ``kept`` as in ``hidden_layers``. ``into``, when given, (scores
        [G, span, Cc], [(pre-activation [pairs, H] where the derivative needs
        it, else None, activation [pairs, H]) per hidden layer]) receives
        them all, written in place rather than into new tensors (the
        forward's kept activations, din_fast.chunked.KeptActivations)."""
        out = None if into is None else self.pre_activation_slot(into[1][0])
        return self.hidden_layers(first_layer(keys, out), kept, into=into)

    def backward(self, grad_s: Tensor, kept: List[tuple], grads: "UnitGrads") -> Tensor:
        """d loss / d z1 [G, span, Cc, H1] from d loss / d s [G, span, Cc]
        (zero at the padding slots), adding the deeper layers' parameter
        gradients into ``grads``."""
        grad_z = grad_s.reshape(-1, 1)
        for layer in reversed(range(len(kept))):
            w, _ = self.deeper[layer]
            z, h = kept[layer]
            if grad_z.shape[1] == 1:
                # The output layer: a product of inner size 1 would sum the
                # block's pairs one after another (1e-5 off in float32 at
                # 50k pairs); torch's sum adds them pairwise.
                grads.deeper_weights[layer] += (grad_z * h).sum(0)
            else:
                grads.deeper_weights[layer].addmm_(grad_z.t(), h)
            grads.deeper_biases[layer] += grad_z.sum(0)
            # Through the output layer an outer product: a broadcast, not a
            # matrix product of inner size 1.
            grad_h = grad_z * w if grad_z.shape[1] == 1 else torch.mm(grad_z, w)
            grad_z, param_grads = activation_backward(
                h if z is None else z, grad_h, self.activation, self.act_params[layer],
                self.dice_eps, output=h)
            for total, grad in zip(grads.act_params[layer], param_grads):
                total += grad
        return grad_z.view(*grad_s.shape, self.hidden[0])

    def query_term_backward(self, query: Tensor, grad_u: Tensor, grads: "UnitGrads",
                            grad_query: Tensor) -> None:
        """Add the query's gradient through u into ``grad_query`` [G * Cc, D]
        (contiguous), from d u (G * Cc rows of H1, summed over the positions)
        of query [G, Cc, D], and W_q + W_d's and b_1's into ``grads``."""
        flat_u = grad_u.reshape(-1, self.hidden[0])
        grads.w_query.addmm_(flat_u.t(), query.flatten(0, -2))
        grads.b_1 += flat_u.sum(0)
        grad_query.addmm_(flat_u, self.w_query)


class FoldedFirstLayer:
    """The folded first layer of a chunk of candidates, query [G, Cc, D]:
    u + M k per pair; accumulates d u and d M over the spans for ``finish``."""

    def __init__(self, unit: ActivationUnit, query: Tensor):
        self.unit = unit
        self.query = query.contiguous()      # M takes its layout, viewed as [G, Cc * H1, D]
        self.u, self.m = unit.fold(self.query)
        self.grad_u = self.grad_m = None

    def __call__(self, keys: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Pre-activations z [G, span, Cc, H1] of keys [G, span, D], written
        into ``out`` (contiguous, their number of elements) where given."""
        rows, span = keys.shape[:2]
        if out is not None:
            out = out.view(rows, span, -1)
        z = torch.baddbmm(self.u, keys, self.m.transpose(1, 2), out=out)
        return z.view(rows, span, -1, self.unit.hidden[0])

    def backward(self, keys: Tensor, grad_z: Tensor, grads: "UnitGrads") -> Tensor:
        """d keys [G, span, D] from d z [G, span, Cc, H1]; d u and d M summed
        here (``grads`` gets the first layer's in ``finish``)."""
        grad_z = grad_z.flatten(2)                                   # [G, span, Cc * H1]
        if self.grad_u is None:
            self.grad_u, self.grad_m = grad_z.sum(1), torch.bmm(grad_z.transpose(1, 2), keys)
        else:
            self.grad_u += grad_z.sum(1)
            self.grad_m.baddbmm_(grad_z.transpose(1, 2), keys)
        return torch.bmm(grad_z, self.m)

    def finish(self, grads: "UnitGrads") -> Tensor:
        """d query [G, Cc, D] from the summed d u and d M, adding the first
        layer's parameter gradients into ``grads``."""
        rows, candidates, dim = self.query.shape
        grad_m = self.grad_m.view(rows * candidates, self.unit.hidden[0], dim)  # [G * Cc, H1, D]
        grads.w_keys += grad_m.sum(0)
        # Products and sums rather than einsum, which copies for these layouts.
        grads.w_p += (grad_m * self.query.view(rows * candidates, 1, dim)).sum(0)
        grad_query = (grad_m * self.unit.w_p).sum(1)                     # [G * Cc, D]
        self.unit.query_term_backward(self.query, self.grad_u, grads, grad_query)
        return grad_query.view(rows, candidates, dim)


class SharedFirstLayer:
    """The shared (unfolded) first layer of a chunk of candidates, query
    [G, Cc, D]: u + (W_k - W_d) k + W_p (q * k) per pair; adds W_k - W_d's
    and W_p's gradients block by block, and sums d u and d query for ``finish``."""

    def __init__(self, unit: ActivationUnit, query: Tensor):
        self.unit = unit
        self.query = query.contiguous()
        self.u = unit.query_term(self.query)                             # [G, Cc, H1]
        self.grad_u = self.grad_query = None

    def __call__(self, keys: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Pre-activations z [G, span, Cc, H1] of keys [G, span, D], written
        into ``out`` where given."""
        return self.unit.first_layer(keys, self.query[:, None], self.u[:, None], out)

    def backward(self, keys: Tensor, grad_z: Tensor, grads: "UnitGrads") -> Tensor:
        """d keys [G, span, D] from d z [G, span, Cc, H1] (zero at the padding slots)."""
        unit = self.unit
        hidden, dim = unit.w_p.shape
        keys = keys.contiguous()
        query = self.query[:, None]                                      # [G, 1, Cc, D]
        flat_z = grad_z.reshape(-1, hidden)
        per_position = grad_z.sum(2)                                     # [G, span, H1]
        grads.w_keys.addmm_(per_position.view(-1, hidden).t(), keys.flatten(0, -2))
        grads.w_p.addmm_(flat_z.t(), (query * keys[:, :, None]).flatten(0, -2))
        grad_products = (flat_z @ unit.w_p).view(*grad_z.shape[:3], dim)  # d (q * k)
        grad_keys = (per_position @ unit.w_keys).add_((grad_products * query).sum(2))
        grad_query = (grad_products * keys[:, :, None]).sum(1)          # [G, Cc, D]
        grad_u = grad_z.sum(1)
        if self.grad_u is None:
            self.grad_u, self.grad_query = grad_u, grad_query
        else:
            self.grad_u += grad_u
            self.grad_query += grad_query
        return grad_keys

    def finish(self, grads: "UnitGrads") -> Tensor:
        """d query [G, Cc, D], adding W_q + W_d's and b_1's gradients into ``grads``."""
        rows, candidates, dim = self.query.shape
        self.unit.query_term_backward(self.query, self.grad_u, grads,
                                      self.grad_query.view(rows * candidates, dim))
        return self.grad_query


class UnitGrads:
    """The activation unit's parameter gradients, summed block by block."""

    def __init__(self, unit: ActivationUnit):
        self.w_query = torch.zeros_like(unit.w_query)
        self.w_keys = torch.zeros_like(unit.w_keys)
        self.w_p = torch.zeros_like(unit.w_p)
        self.b_1 = torch.zeros_like(unit.b_1)
        self.deeper_weights = [torch.zeros_like(w) for w, _ in unit.deeper]
        self.deeper_biases = [torch.zeros_like(b) for _, b in unit.deeper]
        self.act_params = [tuple(torch.zeros_like(p) for p in layer)
                           for layer in unit.act_params]

    def weights(self) -> list:
        """[d W_1 (blocks [q | k | q-k | q*k]), d W_2, ..., d W_out]."""
        first = torch.cat([self.w_query, self.w_keys, self.w_query - self.w_keys, self.w_p],
                          dim=1)
        return [first] + self.deeper_weights

    def biases(self) -> list:
        return [self.b_1] + self.deeper_biases
