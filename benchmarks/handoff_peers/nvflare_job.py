"""FLARE's cyclic workflow (CyclicController via the PyTorch cyclic recipe) in its simulator."""

from __future__ import annotations

import argparse

from nvflare.app_opt.pt.recipes.cyclic import CyclicRecipe
from nvflare.recipe import SimEnv


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--task", choices=("tabular", "minilm"), default="tabular")
    parser.add_argument("--base-model", default="", help="the MiniLM job's base model folder")
    args = parser.parse_args()
    train_args = f"--steps {args.steps} --task {args.task}"
    model: object
    if args.task == "minilm":
        # The server relays the adapter and head only, as Baton does: a module holding exactly
        # peft's adapter tensors, rebuilt by FLARE's persistor from its class path.
        model = {"path": "minilm_net.MiniLMAdapter", "args": {"base_model": args.base_model}}
        train_args += f" --base-model {args.base_model} --sites {args.sites}"
    else:
        from tabular_net import TabularNet

        model = TabularNet()
    recipe = CyclicRecipe(
        num_rounds=args.cycles,
        min_clients=args.sites,
        model=model,
        train_script="nvflare_client.py",
        train_args=train_args,
    )
    run = recipe.execute(env=SimEnv(num_clients=args.sites, workspace_root=args.workspace))
    print("status", run.get_status(), "result", run.get_result(), flush=True)


if __name__ == "__main__":
    main()
