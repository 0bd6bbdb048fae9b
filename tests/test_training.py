"""training: the Trainer shows no progress bar, step table or printed logs where bars are hidden (executed
notebooks, TQDM_DISABLE=1), and keeps its progress bar otherwise."""

from __future__ import annotations

import pytest
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from h3fusion.config import load_profile
from h3fusion.models import tiny_random_llama
from h3fusion.training import hide_progress, training_arguments


@pytest.mark.parametrize("hidden", [True, False])
def test_trainer_progress_output_follows_tqdm_disable(tmp_path, monkeypatch, hidden):
    if hidden:
        monkeypatch.setenv("TQDM_DISABLE", "1")
    else:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    profile = load_profile("smoke")
    model = tiny_random_llama(profile.model.tiny, vocab_size=64, seed=0)
    trainer = Trainer(model=model, args=training_arguments(profile.experts.train, 0, tmp_path))
    hide_progress(trainer)
    kinds = {type(c) for c in trainer.callback_handler.callbacks}
    if hidden:
        assert not kinds & {PrinterCallback, ProgressCallback}
    else:
        assert ProgressCallback in kinds
