"""A site that trains with its own ``transformers.Trainer`` in a fedshield federation.

Name it in the site's own site config and put this directory on the site worker's
PYTHONPATH:

    # site.toml: [site] ... train_fn = "trainer_site:train"
    PYTHONPATH=examples/hf_trainer fedshield site worker --config site.toml

Each round fedshield loads the global adapter into ``model``, calls ``train(model, plan)``,
then computes, prunes, encrypts and sends the update. This site trains on its own data file
(as fedshield tokenized it, ``plan.train``; a site may as well load its own data set here) with
its own TrainingArguments; fedshield.training.hf_trainer.train_round stops the Trainer after the round's
``plan.steps`` optimizer steps and returns (example count, metrics).
"""

from __future__ import annotations

import tempfile

import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from fedshield.training.hf_trainer import train_round


class Rows(torch.utils.data.Dataset):
    """Tokenized rows (input_ids, attention_mask, labels tensors) as a map-style data set."""

    def __init__(self, tensors: dict) -> None:
        self.tensors = {k: torch.as_tensor(v) for k, v in tensors.items()}

    def __len__(self) -> int:
        return int(self.tensors["input_ids"].shape[0])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.tensors.items()}


def train(model, plan):
    out = tempfile.mkdtemp(prefix=f"trainer-site-r{plan.round}-")
    args = TrainingArguments(
        output_dir=out, num_train_epochs=100,         # the callback ends the round
        per_device_train_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.grad_accum, learning_rate=plan.lr,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        seed=plan.seed, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(plan.train),
                      data_collator=default_data_collator)
    return train_round(trainer, plan.steps)
