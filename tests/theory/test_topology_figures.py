"""Topology figures (docs/theory/topology.md §2, §4): what they draw, checked as numbers."""

import itertools

import numpy as np
import pytest
from matplotlib.collections import PathCollection, QuadMesh
from scipy import special

from flowprobe.plots import plt
from flowprobe.theory import topology_figures as tf

pytestmark = pytest.mark.usefixtures("one_thread")


SIZE = 41


def mesh(ax):
    return next(c for c in ax.collections if isinstance(c, QuadMesh)).get_array().reshape(SIZE, SIZE)


def test_ridge_figure_draws_normalised_densities_and_ridge_functions():
    fig = tf.ridge_figure(SIZE)
    rows = np.array(fig.axes[: 3 * len(tf.ridge_rows())]).reshape(-1, 3)
    assert [ax.get_title() for ax in rows[0]] == ["q: unimodal q", "p = f#q", "L = log p(f(z)) − log q(z)"]
    cell = (6 / (SIZE - 1)) ** 2
    assert mesh(rows[0, 0]).sum() * cell == pytest.approx((2 * special.ndtr(3) - 1) ** 2, abs=5e-3)
    for (_, _, (_, w, _)), row in zip(tf.ridge_rows(), rows, strict=True):
        # L depends on z only through wᵀz: it is constant along a grid step (i, j) with w₁i + w₂j = 0
        i, j = next((i, j) for i, j in itertools.product(range(1, 7), range(-6, 7)) if abs(w[0] * i + w[1] * j) < 1e-12)
        ratio = mesh(row[2])  # ratio[r, c] = L(z₁ = grid[c], z₂ = grid[r])
        here = ratio[max(-j, 0): SIZE - max(j, 0), : SIZE - i]
        moved = ratio[max(j, 0): SIZE - max(-j, 0), i:]  # L at z + (i, j)·step
        assert np.abs(here - moved).max() < 1e-7 * np.ptp(ratio) and np.ptp(ratio) > 0.1
    plt.close(fig)


def test_modes_figure_marks_images_of_modes_that_are_modes_of_p():
    fig = tf.modes_figure(seeds=(0,), size=15)
    q_ax, p_ax = fig.axes[:2]
    modes = next(c for c in q_ax.collections if isinstance(c, PathCollection)).get_offsets()
    images, found = (c.get_offsets() for c in p_ax.collections if isinstance(c, PathCollection))
    assert len(modes) == len(images) == len(found) == 4
    assert 1.0 < np.linalg.norm(modes, axis=1).min() <= np.linalg.norm(modes, axis=1).max() < 1.2
    order = [np.lexsort(np.asarray(x).T) for x in (images, found)]
    assert np.abs(np.asarray(images)[order[0]] - np.asarray(found)[order[1]]).max() < 1e-6
    plt.close(fig)
