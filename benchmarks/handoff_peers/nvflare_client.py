"""A FLARE client's visits: receive the model, train, append the visit's timestamps, send it on.

The client script runs for the whole job (``flare.is_running()``), so the MiniLM job's base
model, tokenizer and data stay resident between visits, as at a Baton site.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import nvflare.client as flare
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--task", choices=("tabular", "minilm"), default="tabular")
    parser.add_argument("--base-model", default="")
    parser.add_argument("--sites", type=int, default=4)
    args = parser.parse_args()
    flare.init()
    site = flare.get_site_name()
    index = int(site.rsplit("-", 1)[1]) - 1
    minilm: Any = None
    if args.task == "minilm":
        from minilm_job import MiniLMSite

        minilm = MiniLMSite(args.base_model, index, args.sites)
    while flare.is_running():
        incoming = flare.receive()
        if incoming is None:
            break
        if minilm is not None:
            from minilm_job import adapter_state

            minilm.load(incoming.params)
            timing = minilm.train(args.steps)
            params = adapter_state(minilm.model)
        else:
            from tabular_job import new_model, train_visit

            model = new_model()
            model.load_state_dict({k: torch.as_tensor(v) for k, v in incoming.params.items()})
            timing = train_visit(model, index, args.steps)
            params = model.state_dict()
        with open(os.environ["HANDOFF_VISITS"], "a") as visits:
            visits.write(json.dumps({**timing, "site": site, "round": incoming.current_round}))
            visits.write("\n")
        flare.send(
            flare.FLModel(params=params, params_type="FULL", current_round=incoming.current_round)
        )


if __name__ == "__main__":
    main()
