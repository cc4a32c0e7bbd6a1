def test_the_loss_plot_turns_log_scale_for_a_run_to_a_small_loss_and_leaves_pyplot_alone(tmp_path, monkeypatch):
    """A run to a tiny target loss is only readable on a log scale; an unclosed pyplot figure per eval leaked memory,
    and switching pyplot's backend to Agg took a notebook's plots away after the first eval."""
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from gptgen.plot import plot_losses

    scales, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (scales.append(fig.axes[0].get_yscale()),
                                                                 savefig(fig, *a, **k)))
    backend = matplotlib.get_backend()
    plt.switch_backend("svg")  # a backend of the caller's
    try:
        for val in (0.5, 5.0):
            plot_losses([{"step": 10, "train_loss": 10.0}, {"step": 20, "val_nats_per_token": val}],
                        tmp_path / "loss.png")
            assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
        assert matplotlib.get_backend() == "svg"
    finally:
        plt.switch_backend(backend)
    assert scales == ["log", "linear"] and not plt.get_fignums()
