"""The MiniLM job the peers run, as Baton's ``seq-classification`` hop does it.

all-MiniLM-L6-v2 (a local folder, no download) with LoRA r=8, alpha 16 on ``query``/``value``
and the classification head trained alongside (peft's ``SEQ_CLS`` task), sequences padded to 64
tokens, AdamW at 2e-3 decaying linearly to 0 over the visit, gradients clipped at norm 1, batches
of 16, one torch thread (Baton's sites run with ``threads=1`` in the benchmark). The data is the
demo's generated triage notes (``site_agent/_synthetic.py``, copied next to this file at run time):
240 rows per site, its first 60 % trained on (Baton registers a stratified 60/20/20 split: the
same number of rows, so the same cost per step). Only the adapter and the head move between
sites, as in Baton (peft's adapter state dict, about 300 KB).

Each site keeps its model resident for as long as its process lives (``MiniLMSite``); each visit
reports wall-clock timestamps (``time.time()``) of its first optimizer step's start and its last
step's end, so every peer's handoff is measured the way Baton's ledger measures it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

try:
    from _synthetic import SYNTHETIC_LABELS, generate_site_records
except ImportError:  # inside the Flower app's package
    from batonbench._synthetic import SYNTHETIC_LABELS, generate_site_records

ROWS = 240  # `baton-site demo-data`'s default, what handoff.py's Baton run registers
TRAIN_SHARE = 0.6
MAX_LENGTH = 64
LEARNING_RATE = 2e-3
MAX_GRAD_NORM = 1.0
SEED = 0


def site_examples(site_index: int, n_sites: int) -> tuple[list[str], list[int]]:
    """A site's training texts and label indices."""
    records = generate_site_records(site_index, n_sites, n=ROWS, seed=SEED)
    train = records[: int(len(records) * TRAIN_SHARE)]
    labels = {label: i for i, label in enumerate(SYNTHETIC_LABELS)}
    return [r["text"] for r in train], [labels[r["label"]] for r in train]


def new_model(base_model: str) -> Any:
    """MiniLM for classification over the demo's labels, wrapped with a seeded LoRA adapter."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    base = AutoModelForSequenceClassification.from_pretrained(
        base_model, num_labels=len(SYNTHETIC_LABELS), local_files_only=True
    ).float()
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["query", "value"])  # fmt: skip
    return get_peft_model(base, config)


def adapter_state(model: Any) -> dict[str, Any]:
    """The adapter's and the head's tensors (what moves between sites), detached copies."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def initial_adapter(base_model: str) -> dict[str, Any]:
    """The first site's starting adapter (a fresh seeded one, as Baton's first hop builds)."""
    return adapter_state(new_model(base_model))


class MiniLMSite:
    """One site: tokenizer, base model with its adapter and its encoded rows, kept resident."""

    def __init__(self, base_model: str, site_index: int, n_sites: int) -> None:
        import torch
        from transformers import AutoTokenizer

        self.model = new_model(base_model)
        tokenizer = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
        texts, labels = site_examples(site_index, n_sites)
        self.features = dict(tokenizer(texts, padding="max_length", truncation=True,
                                       max_length=MAX_LENGTH, return_tensors="pt"))  # fmt: skip
        self.targets = torch.tensor(labels)
        self.generator = torch.Generator().manual_seed(site_index)

    def load(self, incoming: Mapping[str, Any]) -> None:
        """Loads the incoming adapter and head; refuses anything that does not fit exactly."""
        import torch
        from peft import set_peft_model_state_dict

        state = {k: torch.as_tensor(v) for k, v in incoming.items()}
        expected = adapter_state(self.model)
        if set(state) != set(expected):
            raise ValueError(f"incoming adapter keys differ: {sorted(set(state) ^ set(expected))}")
        set_peft_model_state_dict(self.model, state)

    def train(self, steps: int, batch_size: int = 16) -> dict[str, float]:
        """One visit's optimizer steps; returns their timestamps and the last loss."""
        import torch
        import torch.nn.functional as F

        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
        self.model.train()
        rows = len(self.targets)
        started = time.time()
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = LEARNING_RATE * (steps - step) / steps
            index = torch.randint(0, rows, (batch_size,), generator=self.generator)
            batch = {name: values[index] for name, values in self.features.items()}
            loss = F.cross_entropy(self.model(**batch).logits.float(), self.targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
        return {"train_start": started, "train_end": time.time(), "loss": float(loss.detach())}
