"""The activation unit on one block of pairs, as matrix products: the torch
backend's arithmetic.

The first layer folds per candidate: with q = query[b, c],
W_1 [q, k, q-k, q*k] + b_1 = u + M k, where u = (W_q + W_d) q + b_1 and
M = (W_k - W_d) + W_p diag(q) is [H1, D]. Stacking the M of a block's
candidates gives one [Cc * H1, D] matrix per row, so the first layer of
every (candidate, position) pair of a row is one product
keys [span, D] x M^T [D, Cc * H1] (a batched product over the block's rows):
one multiply-add per weight and pair, the least a first layer can cost, and
no [pairs, D] product q * k built first. Its output, read as
[span * Cc, H1], feeds the deeper layers as plain matrix products.

The backward runs the same products the other way: d M = dz^T keys and
d keys = dz M per row, from which the first layer's weights and the query
get theirs through the fold.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .activations import activate, activation_backward
from .problem import split_first_layer


class FoldedUnit:
    """The activation unit's parameters in the compute dtype, the first layer
    split for the fold; ``act_params`` per hidden layer as in DINProblem."""

    def __init__(self, problem, dtype: torch.dtype):
        # Contiguous, whatever the parameters' layout: M and u are views of
        # products of them.
        w_q, w_k, w_d, w_p = split_first_layer(problem.weights[0].to(dtype).contiguous())
        self.w_p = w_p.contiguous()
        self.w_query = w_q + w_d                     # applied to q, once per candidate
        self.w_keys = w_k - w_d                      # the part of M every candidate shares
        self.b_1 = problem.biases[0].to(dtype)
        self.deeper = [(w.to(dtype), b.to(dtype))
                       for w, b in zip(problem.weights[1:], problem.biases[1:])]
        self.act_params = [tuple(p.to(dtype) for p in layer) for layer in problem.act_params]
        self.activation = problem.activation
        self.dice_eps = problem.dice_eps
        self.hidden = problem.hidden_units
        # Sigmoid's and relu's derivatives follow from their outputs: the
        # backward keeps those alone; prelu and dice keep the inputs too.
        self.keeps_inputs = problem.activation in ("prelu", "dice")

    def fold(self, query: Tensor):
        """(u [G, 1, Cc * H1], M [G, Cc * H1, D]) of query [G, Cc, D]."""
        rows, candidates, dim = query.shape
        query = query.contiguous()     # M takes its layout, and is viewed as [G, Cc * H1, D]
        u = torch.addmm(self.b_1, query.view(rows * candidates, dim), self.w_query.t())
        m = torch.addcmul(self.w_keys, self.w_p, query[:, :, None, :])
        return u.view(rows, 1, -1), m.view(rows, candidates * self.hidden[0], dim)

    def _activate(self, z: Tensor, layer: int, in_place: bool) -> Tensor:
        """The hidden activation of z [..., H] (in place where it can)."""
        if in_place and self.activation == "sigmoid":
            return z.sigmoid_()
        if in_place and self.activation == "relu":
            return z.relu_()
        return activate(z, self.activation, self.act_params[layer], self.dice_eps)

    def scores(self, keys: Tensor, u: Tensor, m: Tensor,
               kept: Optional[List[tuple]] = None) -> Tensor:
        """Raw scores s [G, span, Cc] of keys [G, span, D] against the folded
        candidates (u, M). ``kept``, when a list, receives per hidden layer
        (pre-activation or None, activation), each [G * span * Cc, H], for
        ``backward``."""
        rows, span = keys.shape[:2]
        h = torch.baddbmm(u, keys, m.transpose(1, 2)).view(-1, self.hidden[0])
        for layer, (w, b) in enumerate(self.deeper):
            z = h
            h = self._activate(z, layer, in_place=not self.keeps_inputs)
            if kept is not None:
                kept.append((z if self.keeps_inputs else None, h))
            h = torch.addmm(b, h, w.t())
        return h.view(rows, span, -1)

    def backward(self, grad_s: Tensor, kept: List[tuple], grads: "UnitGrads") -> Tensor:
        """d loss / d z1 [G, span, Cc * H1] from d loss / d s [G, span, Cc]
        (zero at the padding slots), adding the deeper layers' parameter
        gradients into ``grads``."""
        rows, span = grad_s.shape[:2]
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
            grad_h = grad_z @ w
            grad_z, param_grads = activation_backward(
                h if z is None else z, grad_h, self.activation, self.act_params[layer],
                self.dice_eps, output=h)
            for total, grad in zip(grads.act_params[layer], param_grads):
                total += grad
        return grad_z.view(rows, span, -1)

    def first_layer_backward(self, query: Tensor, m: Tensor, grad_u: Tensor, grad_m: Tensor,
                             grads: "UnitGrads") -> Tensor:
        """d loss / d query [G, Cc, D] from the gradients of the fold's
        outputs, d u [G, Cc * H1] and d M [G, Cc * H1, D] (summed over the
        positions), adding the first layer's into ``grads``."""
        rows, candidates, dim = query.shape
        grad_u = grad_u.view(-1, self.hidden[0])                    # [G * Cc, H1]
        grad_m = grad_m.view(rows * candidates, self.hidden[0], dim)  # [G * Cc, H1, D]
        flat_query = query.reshape(rows * candidates, dim)
        grads.w_query.addmm_(grad_u.t(), flat_query)
        grads.b_1 += grad_u.sum(0)
        grads.w_keys += grad_m.sum(0)
        # Products and sums rather than einsum, which copies for these layouts.
        grads.w_p += (grad_m * flat_query[:, None, :]).sum(0)
        grad_query = (grad_m * self.w_p).sum(1)
        grad_query.addmm_(grad_u, self.w_query)
        return grad_query.view(rows, candidates, dim)


class UnitGrads:
    """The activation unit's parameter gradients, summed block by block."""

    def __init__(self, unit: FoldedUnit):
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
