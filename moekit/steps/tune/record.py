"""What ``tune`` records: the provenance and model card of the tuned MoE, and the held-out routing of its last
evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moekit.arch import router_scoring, stores_selection_bias
from moekit.config import TuneConfig
from moekit.inspection.static import top_k_of
from moekit.manifest import now_iso
from moekit.provenance import read_provenance, write_provenance
from moekit.routing import balance as balance_metrics


def inference_routing(model_dir: Path) -> str:
    """How the saved model routes at inference, in words (its config's own rule; tune never changes it)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    k = top_k_of(config)
    scoring = router_scoring(str(config.get("model_type", "")))
    rule = f"top-{k} of the router's {'sigmoid scores' if scoring == 'sigmoid' else 'softmax'}"
    if stores_selection_bias(str(config.get("model_type", ""))):
        rule += " plus the stored selection bias (e_score_correction_bias) for choosing experts"
    renormalised = config.get("norm_topk_prob", True)  # Mixtral-style families always renormalise and have no such key
    return rule + (
        ", gate values renormalised over the chosen experts"
        if renormalised
        else ", gate values the chosen experts' raw scores"
    )


def provenance_writer(
    model_dir: Path,
    cfg: TuneConfig,
    result_row: dict[str, Any],
    heldout: dict[str, Any],
    hypermoe: dict[str, Any] | None = None,
) -> Any:
    def add(tmp: Path) -> None:
        record = {
            "stage": "tune",
            "created": now_iso(),
            "from": str(model_dir),
            "data": cfg.data,
            "mixture": cfg.mixture or {d: 1 / len(cfg.data) for d in cfg.data},
            "train": cfg.train,
            "balance": {
                "kind": cfg.balance,
                "aux_coef": cfg.aux_coef,
                "z_coef": cfg.z_coef,
                "scope": cfg.balance_scope,
                **({"bias_rate": cfg.bias_rate, "bias_rule": cfg.bias_rule} if cfg.balance == "bias" else {}),
            },
            "routing": cfg.routing,
            **({"router_jitter": cfg.router_jitter} if cfg.router_jitter else {}),
            **({"hypermoe": hypermoe} if hypermoe else {}),
            "inference_routing": inference_routing(cfg.model),
            "loop": cfg.loop.model_dump(mode="json"),
            "final": result_row,
            "heldout_routing": heldout,
        }
        write_provenance(tmp, {"tune": record}, read_provenance(model_dir))
        card = (model_dir / "README.md").read_text() if (model_dir / "README.md").is_file() else f"# {cfg.out.name}\n"
        budget = f"{cfg.loop.max_steps} steps" if cfg.loop.max_steps else f"{cfg.loop.max_tokens:,} tokens"
        balancing = (
            "no balancing loss"
            if cfg.balance == "none"
            else f"{cfg.balance} balancing (coefficient {cfg.aux_coef}, {cfg.balance_scope} scope)"
        )
        if cfg.balance == "bias":
            balancing = f"loss-free balancing (selection bias, {cfg.bias_rule} rule, rate {cfg.bias_rate}" + (
                f", sequence-wise aux loss {cfg.aux_coef})" if cfg.aux_coef else ")"
            )
        extras = (
            (f", router z-loss {cfg.z_coef}" if cfg.z_coef else "")
            + (f", {cfg.routing} routing while training" if cfg.routing != "topk" else "")
            + (f", router jitter {cfg.router_jitter}" if cfg.router_jitter else "")
        )
        if hypermoe:
            extras += (
                f". HyperMoE (Zhao et al. 2024): expert embeddings of width {hypermoe['embed_dim']}, a shared "
                f"hypernetwork of width {hypermoe['hyper_dim']} generating a {hypermoe['adapter_dim']}-wide adapter "
                f"per set of selected experts ({hypermoe['parameters']:,} parameters); load with "
                "trust_remote_code=True"
            )
        card += (
            f"\n## Tuned\n\nFine-tuned by `moekit tune` ({cfg.train} parameters, {budget}) on "
            f"{', '.join(cfg.data)} with {balancing}{extras}. Details: `moekit.yaml`.\n"
        )
        card += f"\nRouting at inference: {inference_routing(model_dir)}"
        card += (
            f". `{cfg.routing}` routing was used only while training; no reader runs it at inference.\n"
            if cfg.routing != "topk"
            else ".\n"
        )
        (tmp / "README.md").write_text(card)

    return add


def heldout_summary(counts: torch.Tensor | None) -> dict[str, Any]:
    """The final evaluation's routing: per-layer assignment counts and MaxVio over the held-out tokens (global: all
    ranks)."""
    if counts is None or not float(counts.sum()):
        return {}
    metrics = [balance_metrics.load_metrics(c) for c in counts]
    return {
        "counts": [[int(v) for v in layer] for layer in counts],
        "maxvio_mean": round(sum(m["maxvio"] for m in metrics) / len(metrics), 6),
        "maxvio_max": round(max(m["maxvio"] for m in metrics), 6),
        "dead_experts": sum(m["dead_experts"] for m in metrics),
    }
