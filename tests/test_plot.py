def test_the_loss_plot_turns_log_scale_for_a_run_to_a_small_loss_and_closes_its_figure(tmp_path, monkeypatch):
    """A run to a tiny target loss is only readable on a log scale; an unclosed figure per eval leaks memory."""
    import matplotlib.pyplot as plt

    from gptgen.plot import plot_losses

    scales, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (scales.append(fig.axes[0].get_yscale()), close(fig)))
    for val in (0.5, 5.0):
        plot_losses([{"step": 10, "train_loss": 10.0}, {"step": 20, "val_nats_per_token": val}], tmp_path / "loss.png")
        assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert scales == ["log", "linear"] and not plt.get_fignums()
