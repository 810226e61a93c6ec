"""The models' history cross term (din_fast.ctr.models.HistoryCross, din-fast
train --history-cross): its value against a literal computation, the logit
it adds, its own learning rate, and the command end to end."""

import json

import pytest
import torch

from din_fast.ctr import export
from din_fast.ctr.checkpoint import load_checkpoint, restored_model
from din_fast.ctr.cli import main
from din_fast.ctr.config import HISTORY_CROSS_LR, TrainConfig, build_model
from din_fast.ctr.errors import InputError
from din_fast.ctr.training import parameter_groups

from cli_data import (evaluation_reproducing, one_torch_thread,  # noqa: F401 (a fixture)
                      write_labeled_log)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELED = ["--label-column", "label", "--features", "genres,hour", "--embed-dim", "4",
           "--batch-size", "32", "--no-progress"]


def literal_term(cross, history_items, history_categories, lengths, target_items,
                 target_categories) -> torch.Tensor:
    """The term row by row and candidate by candidate, in float64: the
    candidate's factors dotted with the mean of the first lengths[b]
    history factors (0 for an empty history), items plus categories."""
    tables = [(cross.item.weight.double(), history_items, target_items)]
    if cross.category is not None:
        tables.append((cross.category.weight.double(), history_categories, target_categories))
    out = torch.zeros(target_items.shape, dtype=torch.float64)
    for b in range(len(lengths)):
        n = int(lengths[b])
        for weight, history, target in tables:
            mean = weight[history[b, :n]].mean(0) if n else torch.zeros(weight.shape[1],
                                                                        dtype=torch.float64)
            out[b] += weight[target[b]] @ mean
    return out


@pytest.mark.parametrize("model", ["din", "base"])
@pytest.mark.parametrize("categories", [3, 0])
@pytest.mark.parametrize("candidates", [None, 4])
def test_the_term_is_the_mean_factor_product_and_adds_to_the_logit(model, categories,
                                                                   candidates):
    """Rows of length 0, 1, T and in between; ids past a row's length are
    real ids (not the padding), which the term must not read."""
    torch.manual_seed(0)
    num_items, length = 11, 5
    config = TrainConfig(model=model, embed_dim=4, history_cross=3, mlp_activation="prelu",
                         attention_activation="sigmoid", mlp_hidden=(6,),
                         attention_hidden=(5,))
    net = build_model(config, num_items, categories).eval()
    lengths = torch.tensor([0, 1, 5, 3, 2])
    history_items = torch.randint(1, num_items + 1, (5, length))
    history_categories = torch.randint(1, categories + 1, (5, length)) if categories else None
    shape = (5,) if candidates is None else (5, candidates)
    target_items = torch.randint(1, num_items + 1, shape)
    target_categories = torch.randint(1, categories + 1, shape) if categories else None
    inputs = (history_items, history_categories, lengths, target_items, target_categories)
    with torch.no_grad():
        term = net.history_cross(*inputs)
        assert term.shape == shape
        torch.testing.assert_close(term.double(), literal_term(net.history_cross, *inputs),
                                   rtol=1e-5, atol=1e-6)
        with_term = net(*inputs)
        cross, net.history_cross = net.history_cross, None
        without = net(*inputs)
        net.history_cross = cross
    torch.testing.assert_close(with_term, without + term)


def test_the_term_trains_at_its_own_rate():
    """In an Adam group of its own: HISTORY_CROSS_LR by default, or
    history_cross_lr; beside the linear part's group; every parameter in
    exactly one group. Its rate without the term is refused."""
    config = TrainConfig(history_cross=4, linear=True, linear_lr=0.05, lr=0.002)
    model = build_model(config, 10, 3, {"genres": 4})
    deep, linear, cross = parameter_groups(model, config)
    assert "lr" not in deep and linear["lr"] == 0.05 and cross["lr"] == HISTORY_CROSS_LR
    assert {id(p) for p in cross["params"]} == {id(p) for p in model.history_cross.parameters()}
    assert sorted(id(p) for g in (deep, linear, cross) for p in g["params"]) == \
        sorted(map(id, model.parameters()))
    given = TrainConfig(history_cross=4, history_cross_lr=0.01)
    assert [g.get("lr") for g in parameter_groups(build_model(given, 10, 3), given)] == \
        [None, 0.01]
    assert len(parameter_groups(build_model(TrainConfig(), 10, 3), TrainConfig())) == 1
    with pytest.raises(InputError, match="`history_cross_lr`.*needs `history_cross`"):
        TrainConfig(history_cross_lr=0.01)
    with pytest.raises(InputError, match="`history_cross` must be an integer >= 0"):
        TrainConfig(history_cross=-1)


def test_train_evaluate_and_export_with_the_term(tmp_path, capsys):
    """The checkpoint rebuilds the term: evaluate reproduces train's test
    metrics, and the exported program (din-fast export's) scores as the
    model does."""
    log = write_labeled_log(tmp_path / "log.csv")
    checkpoint, metrics = tmp_path / "din.pt", tmp_path / "din.json"
    assert main(["train", "--data", str(log), *LABELED, "--history-cross", "3", "--epochs", "1",
                 "--checkpoint", str(checkpoint), "--metrics-out", str(metrics)]) == 0
    evaluation_reproducing(checkpoint, log, json.loads(metrics.read_text()),
                           tmp_path / "eval.json", 1e-6)
    saved = load_checkpoint(checkpoint)
    assert saved.config.history_cross == 3
    model = restored_model(saved, saved.config)
    assert model.history_cross is not None
    example = export.din_example_inputs(model)
    program = torch.export.export(model, example, dynamic_shapes=export.din_dynamic_shapes(model))
    torch.testing.assert_close(program.module()(*example), model(*example))


@pytest.mark.parametrize("arguments, message", [
    (["--history-cross", "-2"], "argument --history-cross: must be an integer >= 0; got -2"),
    (["--history-cross-lr", "0.01"], "`history_cross_lr` is the history cross term's learning "
     "rate; it needs `history_cross` > 0"),
])
def test_bad_history_cross_options_fail_in_one_line(tmp_path, capsys, arguments, message):
    log = write_labeled_log(tmp_path / "log.csv")
    try:
        status = main(["train", "--data", str(log), *LABELED, *arguments])
    except SystemExit as exit:      # argparse's refusal of a value
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("din-fast: error:") and message in err[0], err
