"""Sequential (cyclic) weight transfer with Flower's Message API: one SuperNode per round."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def initial_arrays(context: Context) -> ArrayRecord:
    """The first site's starting weights: the tabular model, or a fresh MiniLM adapter + head."""
    if context.run_config["task"] == "minilm":
        from batonbench.minilm_job import initial_adapter

        return ArrayRecord(initial_adapter(str(context.run_config["base_model"])))
    from batonbench.tabular_job import new_model

    return ArrayRecord(new_model().state_dict())


@app.main()
def main(grid: Grid, context: Context) -> None:
    sites = int(context.run_config["sites"])
    cycles = int(context.run_config["cycles"])
    steps = int(context.run_config["steps"])
    out = Path(str(context.run_config["out"]))
    while len(list(grid.get_node_ids())) < sites:
        time.sleep(0.05)
    nodes = sorted(grid.get_node_ids())[:sites]
    arrays = initial_arrays(context)
    visits = []
    for cycle in range(cycles):
        for position, node in enumerate(nodes):
            content = RecordDict({"arrays": arrays, "config": ConfigRecord({"steps": steps})})
            sent = time.time()
            message = Message(content=content, dst_node_id=node, message_type="train",
                              group_id=str(cycle * sites + position))  # fmt: skip
            (reply,) = list(grid.send_and_receive([message]))
            received = time.time()
            if reply.has_error():
                raise RuntimeError(f"node {node}: {reply.error.reason}")
            arrays = reply.content["arrays"]
            metrics = dict(reply.content["metrics"])
            visits.append({"cycle": cycle, "node": node, "sent": sent, "received": received,
                           **metrics})  # fmt: skip
            print(f"batonbench visit {json.dumps(visits[-1])}", flush=True)
    out.write_text(json.dumps(visits))
