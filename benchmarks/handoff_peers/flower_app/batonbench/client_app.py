"""One site's visit: load the incoming weights, train, send them back with timestamps."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from batonbench.tabular_job import new_model, train_visit

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = int(context.node_config["partition-id"])
    model = new_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    timing = train_visit(model, site, int(msg.content["config"]["steps"]))
    metrics = MetricRecord({**timing, "site": site})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)
