"""A FLARE client's visits: receive the model, train, append the visit's timestamps, send it on."""

from __future__ import annotations

import argparse
import json
import os

import nvflare.client as flare
import torch
from tabular_job import new_model, train_visit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    flare.init()
    site = flare.get_site_name()
    index = int(site.rsplit("-", 1)[1]) - 1
    while flare.is_running():
        incoming = flare.receive()
        if incoming is None:
            break
        model = new_model()
        model.load_state_dict({k: torch.as_tensor(v) for k, v in incoming.params.items()})
        timing = train_visit(model, index, args.steps)
        with open(os.environ["HANDOFF_VISITS"], "a") as visits:
            visits.write(json.dumps({**timing, "site": site, "round": incoming.current_round}))
            visits.write("\n")
        flare.send(
            flare.FLModel(
                params=model.state_dict(),
                params_type="FULL",
                current_round=incoming.current_round,
            )
        )


if __name__ == "__main__":
    main()
