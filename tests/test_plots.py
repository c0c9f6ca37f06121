import torch

from flowprobe.data import load_data
from flowprobe.distributions import rezende_energy
from flowprobe.experiments import rezende_table, table_markdown
from flowprobe.metrics import log_partition
from flowprobe.plots import (
    density_grid,
    flow_log_density,
    plot_density_comparison,
    plot_flow_grid,
    plot_stages,
    plot_training_curve,
    save_figure,
)
from flowprobe.spec import build_flow
from flowprobe.train import FitConfig


def _flow():
    torch.manual_seed(0)
    return build_flow("planar:3:tanh+radial:1", 2)


def test_flow_density_on_the_grid_integrates_to_one():
    axis, density = density_grid(flow_log_density(_flow()), bound=8.0, points=301)
    h = float(axis[1] - axis[0])
    assert abs(float(density.sum()) * h * h - 1) < 1e-3


def test_density_comparison_has_titles_labels_and_colour_bars(tmp_path):
    energy = rezende_energy("U1")
    log_z = log_partition(energy).value
    fig = plot_density_comparison(_flow(), lambda x: -energy.energy(x) - log_z, title="U1", n_samples=200)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["target density $p$", "flow density $q$ (exact, via inverse)", "200 samples of $q$"]
    assert sum(ax.get_ylabel() == "density" for ax in fig.axes) == 2  # two colour bars
    assert all(ax.get_xlabel() for ax in fig.axes if ax.get_ylabel() != "density")
    assert save_figure(fig, tmp_path / "d.png").stat().st_size > 10_000
    fig = plot_density_comparison(_flow(), data=load_data("moons", 500), bound=4.0, n_samples=200)
    assert fig.axes[0].get_title() == "data (500 points, histogram)"
    save_figure(fig, tmp_path / "m.png")


def test_stages_and_training_curve(tmp_path):
    fig = plot_stages(_flow(), n=200, data=load_data("moons", 200))
    assert [ax.get_title() for ax in fig.axes][-1] == "data (target)"
    assert fig.axes[0].get_title() == "source $z$"
    save_figure(fig, tmp_path / "s.png")
    records = [{"step": 10 * i, "loss": 1.0 / i, "val_nll": 1.5 / i} for i in range(1, 6)]
    fig = plot_training_curve(records, ylabel="NLL (nats/dim)")
    assert len(fig.axes[0].get_lines()) == 2 and fig.axes[0].get_xlabel() == "step"
    save_figure(fig, tmp_path / "t.png")


def test_rezende_table_and_grid(tmp_path):
    rows, flows = rezende_table(["U1", "U2"], ["planar", "radial"], [2], FitConfig(steps=5, batch_size=64),
                                samples=2000)
    assert [(r["energy"], r["flow"], r["K"]) for r in rows] == [
        ("U1", "planar", 2), ("U1", "radial", 2), ("U2", "planar", 2), ("U2", "radial", 2)]
    assert all(r["kl"] > 0 and 0 < r["ess_fraction"] <= 1 for r in rows)
    table = table_markdown(rows).splitlines()
    assert table[0] == "| energy | planar K=2 | radial K=2 |" and table[2].startswith("| U1 | ")
    energies = {name: rezende_energy(name) for name in ("U1", "U2")}
    grid = [(name, lambda x, e=energy: -e.energy(x)) for name, energy in energies.items()]
    fig = plot_flow_grid(grid, ["planar K=2", "radial K=2"], flows, points=40, caption="test")
    assert len(fig.axes) == 6 + 6  # panels + colour bars
    save_figure(fig, tmp_path / "g.png")
