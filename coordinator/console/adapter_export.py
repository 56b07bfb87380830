"""Writes a completed run's final checkpoint as a folder people can load outside Baton.

LoRA runs become a PEFT adapter folder (`adapter_model.safetensors`, `adapter_config.json` naming
the base model and carrying the plan's labels as id2label/label2id, a model card); tabular
models are not PEFT adapters and are written as `model.safetensors` with Baton's manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from coordinator.store import fsync_write
from protocols.checkpoint import inspect_bundle

__all__ = ["ExportError", "base_model_of", "write_final_adapter"]


class ExportError(Exception):
    """The checkpoint cannot be written as asked (nothing is left half-written)."""


def base_model_of(sites: list[Any], base_model_sha256: str) -> str | None:
    """The name sites registered for a base model hash (ListSites rows), if exactly one."""
    names = {
        model.name
        for site in sites
        for model in site.base_models
        if model.sha256 == base_model_sha256
    }
    return names.pop() if len(names) == 1 else None


def _model_card(title: str, lines: list[str], front_matter: dict[str, str]) -> bytes:
    head = "".join(f"{key}: {value}\n" for key, value in front_matter.items())
    body = "\n".join(f"- {line}" for line in lines)
    return f"---\n{head}---\n\n# {title}\n\n{body}\n".encode()


def write_final_adapter(
    out: Path,
    data: bytes,
    *,
    run_id: str,
    plan: dict[str, Any],
    base_model: str | None,
) -> list[Path]:
    """Writes the final checkpoint `data` of run `run_id` into the new folder `out`.

    Args:
        out: A folder that does not exist yet or is empty.
        data: The checkpoint bundle (validated here: hash, format, finite values).
        run_id: The run it ends.
        plan: The run's plan (its labels become id2label / label2id).
        base_model: Hub id or path of the base model for a LoRA adapter's config.

    Returns:
        The files written.

    Raises:
        ExportError: A cross-validation run, a LoRA run without a base model name, or `out`
            is not empty.
    """
    bundle = inspect_bundle(data)
    manifest = bundle.manifest
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty: download into a new folder")
    if plan.get("cross_validation") or "cross_validation_folds" in bundle.adapter_config:
        raise ExportError(
            f"run {run_id} is a cross-validation run: its checkpoint holds one model per fold, "
            "not a deployable adapter"
        )
    labels = [str(label) for label in plan.get("labels", ())]
    summary = [
        f"Baton run `{run_id}` (plan `{plan.get('name', '')}`), dataset `{plan.get('dataset')}`",
        f"task: {manifest.task_type}; trained last at site `{manifest.producer_site}`",
        f"checkpoint sha256: `{bundle.sha256}`",
        f"sites in order: {', '.join(f'`{h}`' for h in _sites(plan))}",
    ]
    if labels:
        summary.append(f"labels: {', '.join(labels)}")
    written: dict[str, bytes] = {"baton_manifest.json": manifest.to_json().encode()}
    if manifest.task_type == "tabular":
        written["model.safetensors"] = data
        written["README.md"] = _model_card(
            f"Tabular model from Baton run {run_id[:8]}",
            [*summary, f"architecture: `{json.dumps(bundle.adapter_config, sort_keys=True)}`",
             "not a PEFT adapter: load the tensors with safetensors and Baton's tabular model"],
            {"library_name": "baton", "tags": "[tabular, federated]"},
        )  # fmt: skip
    else:
        if not base_model:
            raise ExportError(
                f"no base model name is known for sha256 {manifest.base_model_sha256}: "
                "give --base-model (its Hugging Face id or local path)"
            )
        config = dict(bundle.adapter_config)
        config["base_model_name_or_path"] = base_model
        if labels:
            config["id2label"] = {str(index): label for index, label in enumerate(labels)}
            config["label2id"] = {label: index for index, label in enumerate(labels)}
        written["adapter_model.safetensors"] = data
        written["adapter_config.json"] = json.dumps(config, indent=2, sort_keys=True).encode()
        written["README.md"] = _model_card(
            f"LoRA adapter from Baton run {run_id[:8]}",
            [*summary, f"base model: `{base_model}` (sha256 `{manifest.base_model_sha256}`)"],
            {"library_name": "peft", "base_model": base_model},
        )
    paths = []
    for name, content in written.items():
        fsync_write(out / name, content)
        paths.append(out / name)
    return paths


def _sites(plan: dict[str, Any]) -> list[str]:
    if plan.get("hops"):
        return [str(hop["site"]) for hop in plan["hops"]]
    return [str(site) for site in plan.get("sites", ())] * int(plan.get("cycles", 1))
