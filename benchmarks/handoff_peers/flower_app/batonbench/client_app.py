"""One site's visit: load the incoming weights, train, send them back with timestamps.

A SuperNode runs each message's ClientApp in a fresh process, so the MiniLM job loads its base
model, tokenizer and data on every visit (Flower keeps no model resident between messages).
"""

from __future__ import annotations

import torch  # noqa: F401  (ArrayRecord's torch conversions need torch imported)
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = int(context.node_config["partition-id"])
    steps = int(msg.content["config"]["steps"])
    incoming = msg.content["arrays"].to_torch_state_dict()
    if context.run_config["task"] == "minilm":
        from batonbench.minilm_job import MiniLMSite, adapter_state

        job = MiniLMSite(str(context.run_config["base_model"]), site,
                         int(context.run_config["sites"]))  # fmt: skip
        job.load(incoming)
        timing = job.train(steps)
        outgoing = adapter_state(job.model)
    else:
        from batonbench.tabular_job import new_model, train_visit

        model = new_model()
        model.load_state_dict(incoming)
        timing = train_visit(model, site, steps)
        outgoing = model.state_dict()
    metrics = MetricRecord({**timing, "site": site})
    content = RecordDict({"arrays": ArrayRecord(outgoing), "metrics": metrics})
    return Message(content=content, reply_to=msg)
