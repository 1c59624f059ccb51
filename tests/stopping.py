"""Stopping a training run part-way, as a crash would, for the resume tests."""

from __future__ import annotations

import pytest


class Interrupt(Exception):
    pass


def stop_at_step(train, cfg, step: int) -> None:
    """Run `train(cfg)` and stop it by raising from its step callback once `step` is done."""

    def interrupt(done, _metrics):
        if done == step:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, step_callback=interrupt)
