"""Figures: a prediction titled with its call, Grad-CAM grids that say when a map is empty."""

from __future__ import annotations

from skincancer import DISCLAIMER


def test_plot_prediction_titles_the_call_with_or_without_a_result(clf, original_images):
    import matplotlib.pyplot as plt

    from skincancer.plotting import plot_prediction

    plain = clf.predict(original_images[0])
    for given in (None, plain):
        fig = plot_prediction(clf, original_images[0], given)
        title = fig._suptitle.get_text()
        assert title.startswith(f"{plain['call']}: probability of malignancy {plain['malignant_probability']:.2f}")
        assert DISCLAIMER in title and len(fig.axes) == 3
        plt.close(fig)
