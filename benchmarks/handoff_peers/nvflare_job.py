"""FLARE's cyclic workflow (CyclicController via the PyTorch cyclic recipe) in its simulator."""

from __future__ import annotations

import argparse

from nvflare.app_opt.pt.recipes.cyclic import CyclicRecipe
from nvflare.recipe import SimEnv
from tabular_net import TabularNet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    recipe = CyclicRecipe(
        num_rounds=args.cycles,
        min_clients=args.sites,
        model=TabularNet(),
        train_script="nvflare_client.py",
        train_args=f"--steps {args.steps}",
    )
    run = recipe.execute(env=SimEnv(num_clients=args.sites, workspace_root=args.workspace))
    print("status", run.get_status(), "result", run.get_result(), flush=True)


if __name__ == "__main__":
    main()
