"""The fast pure-PyTorch backend: the CPU default and the fallback everywhere.

Three savings over the literal formula, all exact:
- the first layer is folded, never building the [.., T, 4D] concat:
  W_1 [q, k, q-k, q*k] = (W_q + W_d) q + (W_k - W_d) k + W_p (q*k), where the
  first term is computed once per candidate and the second once per key,
  shared by every candidate of the row;
- the MLP runs on the valid positions only, packed; padding costs nothing;
- the backward is written by hand: it keeps only the pre-activations of the
  packed positions (no concat, no copies of the keys, no autograd graph of
  the MLP) and recomputes the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .activations import activate
from .problem import DINProblem, split_first_layer
from .reference import masked_normalize


class PackedPositions:
    """The valid (row, position) pairs of a batch, in row-major order.

    ``rows``/``cols`` are None when every position is valid: then packing is a
    free reshape instead of a gather.
    """

    def __init__(self, valid: torch.Tensor, all_valid: bool):
        self.batch, self.length = valid.shape
        self.valid = valid
        if all_valid:
            self.rows = self.cols = None
            self.count = self.batch * self.length
        else:
            self.rows, self.cols = valid.nonzero(as_tuple=True)
            self.count = self.rows.shape[0]

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]"""
        if self.rows is None:
            return dense.reshape(self.count, *dense.shape[2:])
        return dense[self.rows, self.cols]

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
        out = packed.new_zeros(self.batch, *packed.shape[1:])
        return out.index_add_(0, self.rows, packed)


@dataclass
class _Config:
    """The non-tensor settings of one call; ``dice_batch_stats`` collects
    Dice's batch statistics (training mode) when it is a list."""

    activation: str
    normalization: Optional[str]
    scale: float
    dice_eps: float
    n_layers: int
    dice_batch_stats: Optional[list]


def _split_tensors(tensors, n_layers):
    """(weights, biases, per-layer activation parameters) from the flat tensor list."""
    weights = tensors[:n_layers + 1]
    biases = tensors[n_layers + 1:2 * n_layers + 2]
    flat = tensors[2 * n_layers + 2:]
    per_layer = len(flat) // n_layers
    params = [tuple(flat[i * per_layer:(i + 1) * per_layer]) for i in range(n_layers)]
    return weights, biases, params


def _dice_batch_params(z: torch.Tensor, params: tuple):
    """Dice's (a, mu, var) with mu and biased var over the packed positions of z."""
    flat = z.flatten(0, 1)
    count = max(flat.shape[0], 1)
    mu = flat.sum(0) / count
    var = (flat - mu).square().sum(0) / count
    return params[0], mu, var


def _activation_vjp(z, params, grad_h, config):
    """(h, dL/dz, dL/dparams) of one hidden layer's activation, by local autograd.

    Elementwise and cheap to recompute. With batch statistics Dice's mean and
    variance are functions of z, so their gradient flows into dL/dz as well.
    """
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        leaves = tuple(p.detach().requires_grad_() for p in params)
        layer_params = leaves
        if config.dice_batch_stats is not None:
            layer_params = _dice_batch_params(z, leaves)
        h = activate(z, config.activation, layer_params, config.dice_eps)
        grads = torch.autograd.grad(h, (z,) + leaves, grad_h)
    return h.detach(), grads[0], grads[1:]


class _TorchDINAttention(torch.autograd.Function):
    """Packed, folded DIN attention with a hand-written backward.

    Tensor inputs are already in the compute dtype: query [B, C, D], keys
    [B, T, D], values [B, T, Dv], then the weights, the biases and the flat
    activation parameters (DINProblem.act_params, concatenated layer by layer).
    """

    @staticmethod
    def forward(ctx, config, packed, query, keys, values, *tensors):
        n_layers = config.n_layers
        weights, biases, params = _split_tensors(tensors, n_layers)
        w_q, w_k, w_d, w_p = split_first_layer(weights[0])
        k_packed = packed.gather(keys)                                     # [N, D]
        q_packed = packed.expand_rows(query)                               # [N, C, D]
        z = packed.expand_rows(query @ (w_q + w_d).t() + biases[0])        # [N, C, H1]
        z += (k_packed @ (w_k - w_d).t())[:, None, :]
        z.flatten(0, 1).addmm_((q_packed * k_packed[:, None, :]).flatten(0, 1), w_p.t())
        preacts = []
        h = z
        for i in range(n_layers):
            preacts.append(h)
            layer_params = params[i]
            if config.dice_batch_stats is not None:
                layer_params = _dice_batch_params(h, layer_params)
                config.dice_batch_stats.append(
                    (layer_params[1], layer_params[2], h.shape[0] * h.shape[1]))
            h = activate(h, config.activation, layer_params, config.dice_eps)
            h = torch.addmm(biases[i + 1], h.flatten(0, 1), weights[i + 1].t()) \
                .view(*h.shape[:2], weights[i + 1].shape[0])
        dense = packed.scatter(h.squeeze(-1)).transpose(1, 2)               # [B, C, T]
        w = masked_normalize(dense, packed.valid, config.normalization, config.scale)
        pooled = w @ values

        ctx.config = config
        ctx.packed = packed
        ctx.values_are_keys = values is keys
        ctx.save_for_backward(query, keys, values, w, *tensors, *preacts)
        return pooled, w

    @staticmethod
    def backward(ctx, grad_pooled, grad_w):
        config, packed = ctx.config, ctx.packed
        n_layers = config.n_layers
        query, keys, values, w, *rest = ctx.saved_tensors
        tensors, preacts = rest[:-n_layers], rest[-n_layers:]
        weights, biases, params = _split_tensors(tensors, n_layers)

        # Pooling and normalization: dL/dw, then dL/ds at the valid positions.
        grad_w_total = grad_pooled @ values.transpose(1, 2)               # [B, C, T]
        if grad_w is not None:
            grad_w_total = grad_w_total + grad_w
        w_packed = packed.gather(w.transpose(1, 2))                        # [N, C]
        grad_v_packed = (w_packed[..., None] * packed.expand_rows(grad_pooled)).sum(1)
        if config.normalization == "softmax":
            grad_w_total = w * (grad_w_total - (w * grad_w_total).sum(-1, keepdim=True))
        grad_next = packed.gather((grad_w_total * config.scale).transpose(1, 2))[..., None]

        # The MLP, last layer first: grad_next is dL/d(pre-activation) of the
        # layer that consumes layer i's output; activations are recomputed.
        grad_weights = [None] * (n_layers + 1)
        grad_biases = [None] * (n_layers + 1)
        grad_params = [None] * n_layers
        for i in reversed(range(n_layers)):
            grad_h = grad_next @ weights[i + 1]
            h, grad_z, grad_params[i] = _activation_vjp(preacts[i], params[i], grad_h, config)
            del grad_h
            grad_weights[i + 1] = grad_next.flatten(0, 1).t() @ h.flatten(0, 1)
            grad_biases[i + 1] = grad_next.sum((0, 1))
            del h
            grad_next = grad_z
        grad_z = grad_next                                                 # [N, C, H1]
        del grad_next

        # The folded first layer: z1 = (W_q + W_d) q + (W_k - W_d) k + W_p (q*k) + b_1.
        w_q, w_k, w_d, w_p = split_first_layer(weights[0])
        k_packed = packed.gather(keys)                                     # [N, D]
        q_packed = packed.expand_rows(query)                               # [N, C, D]
        grad_u = packed.sum_rows(grad_z)                                   # [B, C, H1]
        grad_z_keys = grad_z.sum(1)                                        # [N, H1]
        grad_fold_q = grad_u.flatten(0, 1).t() @ query.flatten(0, 1)      # d(W_q + W_d)
        grad_fold_k = grad_z_keys.t() @ k_packed                           # d(W_k - W_d)
        grad_w_p = grad_z.flatten(0, 1).t() @ (q_packed * k_packed[:, None, :]).flatten(0, 1)
        grad_weights[0] = torch.cat(
            [grad_fold_q, grad_fold_k, grad_fold_q - grad_fold_k, grad_w_p], dim=1)
        grad_biases[0] = grad_u.sum((0, 1))
        grad_qk = grad_z @ w_p                                             # [N, C, D]
        del grad_z
        grad_query = grad_u @ (w_q + w_d) + packed.sum_rows(grad_qk * k_packed[:, None, :])
        del k_packed
        grad_k_packed = (grad_qk * q_packed).sum(1).addmm_(grad_z_keys, w_k - w_d)
        del grad_qk, q_packed, grad_z_keys
        if ctx.values_are_keys:
            grad_keys, grad_values = packed.scatter(grad_k_packed.add_(grad_v_packed)), None
        else:
            grad_keys, grad_values = packed.scatter(grad_k_packed), packed.scatter(grad_v_packed)
        flat_grad_params = [g for layer in grad_params for g in layer]
        return (None, None, grad_query, grad_keys, grad_values,
                *grad_weights, *grad_biases, *flat_grad_params)


def torch_din_attention(problem: DINProblem, dice_batch_stats=None):
    """Returns (pooled [B, C, Dv], weights w [B, C, T]) in the compute dtype.

    With ``dice_batch_stats`` (a list), Dice normalizes each layer with the mean
    and biased variance of its pre-activations over the valid positions, as
    BatchNorm does in training, and appends (mu, var, count) per layer.
    """
    dtype = problem.compute_dtype()
    all_valid = problem.lengths is None and problem.mask is None
    packed = PackedPositions(problem.valid_mask(), all_valid)
    config = _Config(problem.activation, problem.normalization, problem.scale,
                     problem.dice_eps, len(problem.act_params), dice_batch_stats)
    tensors = [t.to(dtype) for t in problem.weights + problem.biases]
    # With batch statistics Dice's given mu and var (the module's running
    # statistics, updated in place afterwards) take no part: pass only a.
    act_params = problem.act_params if dice_batch_stats is None else \
        [layer[:1] for layer in problem.act_params]
    tensors += [p.to(dtype) for layer in act_params for p in layer]
    keys = problem.keys.to(dtype)
    values = keys if problem.values is None else problem.values.to(dtype)
    return _TorchDINAttention.apply(config, packed, problem.query.to(dtype), keys, values,
                                    *tensors)
