"""Federated rounds from a ``transformers.Trainer``: a callback that stops it after the round's
steps, and a thin wrapper that runs one round and returns what a site's ``train-fn`` returns.

    def train(model, plan):                        # train-fn = "my_site:train"
        trainer = Trainer(model=model, args=TrainingArguments(..., learning_rate=plan.lr),
                          train_dataset=my_dataset)
        return train_round(trainer, plan.steps)    # (num_examples, {"loss": ...})
"""

from __future__ import annotations

from transformers import TrainerCallback

from ..base.errors import ParameterError
from ..base.validate import is_int


class StopAfterSteps(TrainerCallback):
    """Stops training ``steps`` optimizer steps after it began (``control.should_training_stop``),
    whatever the Trainer's own epochs or max_steps say."""

    def __init__(self, steps: int) -> None:
        if not is_int(steps) or steps < 1:
            raise ParameterError(f"steps={steps!r} must be an int >= 1")
        self.steps = steps
        self.start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step - self.start >= self.steps:
            control.should_training_stop = True
        return control


def train_round(trainer, steps: int) -> tuple[int, dict[str, float]]:
    """Trains ``trainer`` for ``steps`` optimizer steps; returns (its training examples, metrics
    with the mean training ``loss`` and the steps taken)."""
    stop = StopAfterSteps(steps)
    trainer.add_callback(stop)
    try:
        output = trainer.train()
    finally:
        trainer.remove_callback(stop)
    dataset = trainer.train_dataset
    if dataset is None or len(dataset) == 0:
        raise ParameterError("the Trainer has no training examples (train_dataset)")
    return len(dataset), {"loss": float(output.training_loss),
                          "steps": float(trainer.state.global_step - stop.start)}
