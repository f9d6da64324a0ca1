"""Figures: meta-training curves from a run's log, and the gates of the learned update rule.

matplotlib is imported only when a figure is drawn (``pip install "learned_optim[plot]"``), with
the non-interactive Agg backend, so plotting works on a headless machine.

- :func:`plot_run`: ``metrics.jsonl`` of a run folder -> PNG of meta-loss, training and
  validation score (with its 95% CI) against the meta-step.
- :func:`record_gates` and :func:`plot_gates`: the forget gate f_t and input gate i_t of
  :class:`~learned_optim.LSTMMetaOptimizer`, per learner parameter tensor, over the inner
  steps of a few episodes.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from learned_optim.runstate import METRICS_LOG, log_path, read_log

__all__ = ["gate_values", "record_gates", "plot_gates", "plot_run", "pyplot"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or an error that names the missing extra."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: "
            'pip install "learned_optim[plot]" (or pip install matplotlib)'
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gate_values(optimizer, names: dict | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
    """The current forget and input gates of every parameter an optimizer has stepped.

    After each :meth:`LSTMMetaOptimizer.step`, ``optimizer.state[p]["lstm_state"]`` holds, per
    coordinate, ``[h1 | c1 | f_pre | i_pre]``; the gates are f_t = sigmoid(f_pre) and
    i_t = sigmoid(i_pre), the factors of theta_t = f_t * theta_{t-1} - i_t * grad_t.

    Parameters
    ----------
    optimizer:
        A :class:`~learned_optim.LSTMMetaOptimizer` that has taken at least one step.
    names:
        Parameter -> display name (e.g. ``{p: n for n, p in model.named_parameters()}``);
        parameters are called ``param0, param1, ...`` otherwise.

    Returns
    -------
    dict
        Name -> ``(forget, input)``, two float tensors shaped like the parameter.

    Examples
    --------
    >>> from learned_optim import LSTMMetaOptimizer
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = LSTMMetaOptimizer(model.parameters())
    >>> loss = model(torch.ones(2, 3)).pow(2).mean()
    >>> loss.backward(); opt.step(loss=loss)
    >>> gates = gate_values(opt, {p: n for n, p in model.named_parameters()})
    >>> forget, input_ = gates["weight"]
    >>> forget.shape, bool((forget > 0.9).all()), bool((input_ < 0.1).all())
    (torch.Size([1, 3]), True, True)
    """
    names = names or {}
    values = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        lstm_state = optimizer.state.get(param, {}).get("lstm_state")
        if lstm_state is None:
            continue
        pre = lstm_state[:, -2:].detach().float().cpu()  # columns f_pre, i_pre
        gates = torch.sigmoid(pre)
        name = names.get(param, f"param{index}")
        values[name] = (gates[:, 0].reshape(param.shape), gates[:, 1].reshape(param.shape))
    return values


def record_gates(
    optimizer, *, step: int, episode: int = 0, model: nn.Module | None = None
) -> list[dict]:
    """Summary records of the current gates, one per parameter tensor, for :func:`plot_gates`.

    Parameters
    ----------
    optimizer:
        A :class:`~learned_optim.LSTMMetaOptimizer`, just after a step.
    step:
        The inner step just taken (1 for the first).
    episode:
        Which episode (task) this step belongs to.
    model:
        The model being trained, to name the tensors (``"head.weight"``).

    Returns
    -------
    list of dict
        ``{"episode", "step", "layer", "forget_mean", "forget_std", "input_mean",
        "input_std"}`` (JSON-serialisable); the spread is over the tensor's coordinates.

    Examples
    --------
    >>> from learned_optim import LSTMMetaOptimizer
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = LSTMMetaOptimizer(model.parameters())
    >>> loss = model(torch.ones(2, 3)).pow(2).mean()
    >>> loss.backward(); opt.step(loss=loss)
    >>> [r["layer"] for r in record_gates(opt, step=1, model=model)]
    ['weight', 'bias']
    """
    names = {p: n for n, p in model.named_parameters()} if model is not None else None
    records = []
    for layer, (forget, input_) in gate_values(optimizer, names).items():
        records.append({
            "episode": int(episode), "step": int(step), "layer": layer,
            "forget_mean": forget.mean().item(),
            "forget_std": forget.std(unbiased=False).item(),
            "input_mean": input_.mean().item(),
            "input_std": input_.std(unbiased=False).item(),
        })
    return records


def plot_gates(records: Iterable[dict], out_png: str | os.PathLike,
               title: str | None = None) -> Path:
    """Draw the forget and input gates over the inner steps, one line per parameter tensor.

    Each line is the mean over episodes of the tensor's mean gate value at that step; the band
    is the mean spread (one standard deviation) over the tensor's coordinates.

    Parameters
    ----------
    records:
        What :func:`record_gates` returned, concatenated over steps and episodes.
    out_png:
        Where to write the figure (folders are created).
    title:
        Figure title.

    Returns
    -------
    pathlib.Path
        The written PNG.

    Examples
    --------
    >>> import tempfile
    >>> records = [{"episode": 0, "step": s, "layer": "w", "forget_mean": 0.99,
    ...             "forget_std": 0.001, "input_mean": 0.01, "input_std": 0.002}
    ...            for s in (1, 2, 3)]
    >>> plot_gates(records, tempfile.mkdtemp() + "/gates.png").suffix
    '.png'
    """
    records = list(records)
    if not records:
        raise ValueError("no gate records to plot (record them after each optimizer step)")
    plt = pyplot()
    # layer -> step -> list of per-episode records
    table: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        table[record["layer"]][int(record["step"])].append(record)
    episodes = len({r.get("episode", 0) for r in records})
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    colours = plt.get_cmap("viridis")
    for index, (layer, by_step) in enumerate(table.items()):
        colour = colours(index / max(1, len(table) - 1))
        steps = sorted(by_step)
        for axis, gate in zip(axes, ("forget", "input")):
            mean = [_average(by_step[s], f"{gate}_mean") for s in steps]
            spread = [_average(by_step[s], f"{gate}_std") for s in steps]
            axis.plot(steps, mean, marker="o", markersize=3, color=colour, label=layer)
            axis.fill_between(steps, [m - d for m, d in zip(mean, spread)],
                              [m + d for m, d in zip(mean, spread)], color=colour, alpha=0.15)
    axes[0].set_title("forget gate $f_t$ (1 = keep $\\theta_{t-1}$)")
    axes[1].set_title("input gate $i_t$ (step size on $-\\nabla_t$)")
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.set_xlabel("inner step t")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5),
                   title="parameter tensor", title_fontsize=8)
    figure.suptitle(title or f"Gates of the learned update rule (mean over {episodes} "
                    f"episode{'s' if episodes != 1 else ''}, band: spread over coordinates)",
                    fontsize=10)
    return _save(plt, figure, out_png)


def _average(records: Sequence[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def _save(plt, figure, out_png: str | os.PathLike) -> Path:
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_run(run_dir: str | os.PathLike, out_png: str | os.PathLike | None = None) -> Path:
    """Draw a meta-training run's curves from its ``metrics.jsonl`` and save them as a PNG.

    Three panels against the meta-step: the meta-loss (query loss after the inner loop), the
    training score of the meta-batches, and the validation score with its 95% confidence band.

    Parameters
    ----------
    run_dir:
        The run folder (``run_dir`` of :class:`~learned_optim.config.MetaTrainConfig`).
    out_png:
        Output file; default ``RUN_DIR/curves.png``.

    Returns
    -------
    pathlib.Path
        The written PNG.

    Raises
    ------
    FileNotFoundError
        If ``run_dir`` has no metrics log (:data:`~learned_optim.runstate.METRICS_LOG`).
    ValueError
        If the log holds no entries yet.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from learned_optim.runstate import append_log
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> entries = [{"step": 0, "val_mse": 3.0, "val_mse_ci95": 0.5},
    ...            {"step": 1, "meta_loss": 2.9, "train_mse": 2.9},
    ...            {"step": 2, "meta_loss": 2.5, "train_mse": 2.5},
    ...            {"step": 2, "val_mse": 2.4, "val_mse_ci95": 0.4}]
    >>> for entry in entries:
    ...     append_log(run, entry)
    >>> plot_run(run).name
    'curves.png'
    """
    run_dir = Path(run_dir)
    if not log_path(run_dir).is_file():
        raise FileNotFoundError(f"{run_dir} has no {METRICS_LOG}: not a meta-training run folder")
    log = read_log(run_dir)
    if not log:
        raise ValueError(f"{log_path(run_dir)} is empty: the run has not logged yet")
    train = [e for e in log if "meta_loss" in e]
    metric = next((k[len("train_"):] for e in train for k in e if k.startswith("train_")), None)
    if metric is None:
        metric = next((k[len("val_"):] for e in log for k in e
                       if k.startswith("val_") and not k.endswith("_ci95")
                       and k != "val_episodes"), "score")
    validation = [e for e in log if f"val_{metric}" in e]

    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    steps = [e["step"] for e in train]
    axes[0].plot(steps, [e["meta_loss"] for e in train], color="tab:blue", alpha=0.35,
                 label="per meta-step")
    axes[0].plot(steps, _smooth([e["meta_loss"] for e in train]), color="tab:blue",
                 label="moving average")
    axes[0].set_title("meta-loss (query loss after T steps)")
    key = f"train_{metric}"
    values = [e[key] for e in train if key in e]
    axes[1].plot(steps[: len(values)], values, color="tab:orange", alpha=0.35)
    axes[1].plot(steps[: len(values)], _smooth(values), color="tab:orange")
    axes[1].set_title(f"training {metric} (meta-batches)")
    if validation:
        v_steps = [e["step"] for e in validation]
        v_mean = [e[f"val_{metric}"] for e in validation]
        v_ci = [e.get(f"val_{metric}_ci95", 0.0) for e in validation]
        axes[2].plot(v_steps, v_mean, marker="o", color="tab:green")
        axes[2].fill_between(v_steps, [m - c for m, c in zip(v_mean, v_ci)],
                             [m + c for m, c in zip(v_mean, v_ci)], color="tab:green",
                             alpha=0.2, label="95% CI")
        axes[2].legend(fontsize=8)
    axes[2].set_title(f"validation {metric}")
    for axis in axes:
        axis.set_xlabel("meta-step")
        axis.grid(alpha=0.3)
    if train:
        axes[0].legend(fontsize=8)
    figure.suptitle(f"{run_dir.name}", fontsize=10)
    return _save(plt, figure, out_png if out_png is not None else run_dir / "curves.png")


def _smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Trailing moving average (window ~ 5% of the run, at least 1)."""
    window = window or max(1, len(values) // 20)
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out
