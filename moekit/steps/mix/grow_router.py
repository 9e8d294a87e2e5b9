"""The new expert's router row for ``mix --add-expert``: the centroid method, against the rows the MoE has.

The existing rows stay as they are (they may be trained), so the new row is set relative to them.
For each MoE layer, with router inputs x (the hidden state entering the MoE block, captured from
the MoE itself on calibration data of the new domain and of existing ones):

1. Centroid start: ``w = mean(w_1..w_E) + a u - b m``, u the unit direction from the existing
   domains' centroid (their mean, or one of them: each is a candidate) to the new domain's, m the
   unit mean hidden state (where every token has a positive component along it, ``b`` acts as the
   bias the router lacks). At a = b = 0 the new logit is the mean of the existing logits.
   (a, b, u) are chosen by search to maximise TPR - 4 FPR: TPR the share of new-domain tokens that
   get the new expert in their top-k, FPR the share of existing-domain tokens that do (weighted
   four times: the old domains must keep what they had).
2. Fit: the row is refined from that start by a weighted logistic fit of the same event (the new
   expert's score beats the k-th best existing score; old rows fixed), a few L-BFGS iterations on at
   most ``_FIT_TOKENS`` tokens per domain. A direction and an offset alone rarely separate
   neighbouring domains (prose next to code); the fit uses every hidden dimension.

TPR and FPR of the final row are recorded. Scores are the family's own (softmax: the logits;
sigmoid: sigmoid(z) plus the selection bias, compared in logit space).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.devices import choose_device

_GRID = np.concatenate([[0.0], np.geomspace(1e-2, 1e2, 41)])  # multiples of the layer's logit-scale ratio
_BATCH = 8  # calibration blocks per forward
# tokens per domain (strided sample) on which the row is chosen: memory is layers x domains x this x hidden x 2 bytes
_FIT_TOKENS = 1024
# an existing domain's token sent to the new expert costs four new-domain tokens kept from it: the old domains come
# first
FPR_WEIGHT = 4.0


@dataclass
class AddedRows:
    """The new router row of every MoE layer, and how well it separates the domains at the start."""

    rows: np.ndarray  # [layers, hidden] fp32
    # per layer: share of new-domain tokens with the new expert in their top-k
    new_top_k: list[float] = field(default_factory=list)
    old_top_k: list[float] = field(default_factory=list)  # per layer: share of existing-domain tokens with it
    init: str = "calibrated"  # or "mean": the mean of the existing rows, no calibration data

    def summary(self) -> dict[str, Any]:
        """Averages and per-layer figures for the provenance record."""
        if not self.new_top_k:
            return {"init": self.init}
        return {
            "init": self.init,
            "init_new_domain_top_k": round(float(np.mean(self.new_top_k)), 4),
            "init_old_domains_top_k": round(float(np.mean(self.old_top_k)), 4),
            "init_new_domain_top_k_per_layer": [round(v, 4) for v in self.new_top_k],
            "init_old_domains_top_k_per_layer": [round(v, 4) for v in self.old_top_k],
        }


def _router_inputs(
    model: torch.nn.Module, routers: list[tuple[str, torch.nn.Module]], blocks: torch.Tensor, visit: Any
) -> None:
    """Run ``blocks`` through ``model``; call ``visit(layer, x)`` with each router's input [tokens, hidden] (fp32)."""

    def hook(layer: int) -> Any:
        def capture(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            hidden = args[0]
            visit(layer, hidden.reshape(-1, hidden.shape[-1]).float().cpu())

        return capture

    handles = [module.register_forward_pre_hook(hook(i)) for i, (_, module) in enumerate(routers)]
    try:
        with torch.no_grad():
            for start in range(0, blocks.shape[0], _BATCH):
                model(input_ids=blocks[start : start + _BATCH].to(model.device))
    finally:
        for handle in handles:
            handle.remove()


def _domain_means(
    model: torch.nn.Module, routers: list[Any], blocks: dict[str, torch.Tensor]
) -> dict[str, list[torch.Tensor]]:
    """Per domain, the mean router input of every layer."""
    means: dict[str, list[torch.Tensor]] = {}
    for domain, domain_blocks in blocks.items():
        sums = [torch.zeros(0)] * len(routers)
        counts = [0] * len(routers)

        def add(layer: int, x: torch.Tensor) -> None:
            sums[layer] = x.sum(0) if counts[layer] == 0 else sums[layer] + x.sum(0)
            counts[layer] += x.shape[0]

        _router_inputs(model, routers, domain_blocks, add)
        means[domain] = [s / c for s, c in zip(sums, counts)]
    return means


def _candidate_directions(
    means: dict[str, list[torch.Tensor]], new_domain: str, old_domains: list[str], layer: int
) -> torch.Tensor:
    """Unit directions from the existing domains' centroids to the new one's [C, H]: from their mean, and from each.

    The contrast with the mean separates the new domain from all at once; the contrast with one
    domain is the better one when that domain lies close to the new one (prose next to code).
    """
    new = means[new_domain][layer]
    targets = [torch.stack([means[d][layer] for d in old_domains]).mean(0), *(means[d][layer] for d in old_domains)]
    deltas = torch.stack([new - t for t in targets])
    return deltas / deltas.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _best_offset(
    margin: np.ndarray, common: np.ndarray | None, is_new: np.ndarray
) -> tuple[float, float, float, float]:
    """The offset b maximising TPR - FPR_WEIGHT x FPR for membership ``margin - b * common > 0``: (objective, b, TPR,
    FPR).

    ``common`` (each token's component along the mean hidden state) is positive for every token, so
    the offset acts as the bias the router lacks: membership is ``margin / common > b``, and the best
    b is found from the tokens sorted by that ratio (b just below one of them; b above all: nobody).
    Without such a component (``common`` None) b is 0.
    """
    if common is None:
        member = margin > 0
        tpr, fpr = float(member[is_new].mean()), float(member[~is_new].mean())
        return tpr - FPR_WEIGHT * fpr, 0.0, tpr, fpr
    ratio = margin / common
    order = np.argsort(-ratio, kind="stable")
    new_sorted = is_new[order]
    tpr = np.cumsum(new_sorted) / max(1, int(is_new.sum()))
    fpr = np.cumsum(~new_sorted) / max(1, int((~is_new).sum()))
    objective = tpr - FPR_WEIGHT * fpr
    j = int(np.argmax(objective))
    if objective[j] <= 0.0:
        return 0.0, float(ratio.max()) + 1.0, 0.0, 0.0
    below = ratio[order[j + 1]] if j + 1 < len(order) else ratio[order[j]] - 1.0
    return float(objective[j]), float((ratio[order[j]] + below) / 2), float(tpr[j]), float(fpr[j])


def _choose_row(
    base: np.ndarray, projections: np.ndarray, common: np.ndarray | None, threshold: np.ndarray, is_new: np.ndarray
) -> tuple[int, float, float, float, float]:
    """(direction, a, b, TPR, FPR) of the row ``w_bar + a u - b m`` that best separates the domains."""
    spread = float(np.std(base)) or 1.0
    best = (-np.inf, 0, 0.0, 0.0, 0.0, 0.0)
    for c in range(projections.shape[1]):
        unit = spread / (float(np.std(projections[:, c])) or 1.0)
        for step in _GRID:
            a = float(step * unit)
            objective, b, tpr, fpr = _best_offset(base + a * projections[:, c] - threshold, common, is_new)
            if objective > best[0] + 1e-9:
                best = (objective, c, a, b, tpr, fpr)
    return best[1], best[2], best[3], best[4], best[5]


def _load_for_calibration(moe_dir: Path) -> torch.nn.Module:
    """The MoE for the calibration forwards: fp32 on a CPU; on GPUs in bf16, spread over them (and the CPU) by
    accelerate's device map, so an MoE larger than one GPU still runs. Router inputs are taken in fp32 either way."""
    from transformers import AutoModelForCausalLM

    from moekit.modeling import register

    register()
    if choose_device().type == "cuda":
        return AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.bfloat16, device_map="auto").eval()
    return AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()


def _fit_row(
    start: torch.Tensor, x: np.ndarray, threshold: np.ndarray, is_new: np.ndarray, steps: int = 60
) -> tuple[np.ndarray, float, float]:
    """Refine the centroid row by a weighted logistic fit of "the new expert is in the top-k" (old rows fixed): (row,
    TPR, FPR)."""
    inputs, limit = torch.from_numpy(x).float(), torch.from_numpy(threshold).float()
    target = torch.from_numpy(is_new)
    sign = target.float() * 2 - 1
    weight = torch.where(target, 1.0 / max(1, int(target.sum())), FPR_WEIGHT / max(1, int((~target).sum())))
    scale = float((inputs @ start - limit).std()) or 1.0
    row = start.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([row], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = (weight * torch.nn.functional.softplus(-sign * (inputs @ row - limit) / scale)).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        member = (inputs @ row - limit) > 0
    return row.detach().numpy(), float(member[target].float().mean()), float(member[~target].float().mean())


def added_router_rows(
    moe_dir: Path,
    new_domain: str,
    blocks: dict[str, torch.Tensor],
    scoring: str,
    top_k: int,
    biases: list[np.ndarray] | None,
) -> AddedRows:
    """The new expert's router row per layer (see the module docstring); ``blocks``: calibration token blocks per
    domain.

    ``biases``: each layer's selection bias [E] (sigmoid-scoring families), or None.
    """
    from moekit.routing.control import find_routers

    model = _load_for_calibration(moe_dir)
    routers = find_routers(model)
    means = _domain_means(model, routers, blocks)
    old_domains = [d for d in blocks if d != new_domain]
    directions = [_candidate_directions(means, new_domain, old_domains, layer) for layer in range(len(routers))]
    centres = [torch.stack([means[d][layer] for d in blocks]).mean(0) for layer in range(len(routers))]
    centres = [c / c.norm().clamp_min(1e-12) for c in centres]
    weights = [module.weight.detach().float().cpu() for _, module in routers]
    gathered: list[dict[str, list[np.ndarray]]] = [
        {"logits": [], "projection": [], "common": [], "x": [], "is_new": []} for _ in routers
    ]
    for domain, domain_blocks in blocks.items():
        # the row is chosen on at most _FIT_TOKENS tokens per domain
        stride = max(1, -(-domain_blocks.numel() // _FIT_TOKENS))

        def keep(layer: int, x: torch.Tensor, is_new: bool = domain == new_domain, stride: int = stride) -> None:
            store = gathered[layer]
            x = x[::stride]
            store["logits"].append((x @ weights[layer].T).numpy())
            store["projection"].append((x @ directions[layer].T).numpy())
            store["common"].append((x @ centres[layer]).numpy())
            store["x"].append(x.half().numpy())  # fp16: every layer's sample is kept until the fit
            store["is_new"].append(np.full(x.shape[0], is_new))

        _router_inputs(model, routers, domain_blocks, keep)
    result = AddedRows(np.zeros((len(routers), weights[0].shape[1]), dtype=np.float32))
    for layer, store in enumerate(gathered):
        logits = np.concatenate(store["logits"])
        projection = np.concatenate(store["projection"])
        is_new = np.concatenate(store["is_new"])
        common = np.concatenate(store["common"])
        base = logits.mean(axis=1)  # the mean row's logit: w_bar . x
        if scoring == "sigmoid":  # the new expert's score sigmoid(z) + its bias must beat the k-th best old score
            bias = biases[layer] if biases is not None else np.zeros(logits.shape[1], dtype=np.float32)
            old = 1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0))) + bias
            need = np.clip(np.sort(old, axis=1)[:, -min(top_k, old.shape[1])] - float(bias.mean()), 1e-7, 1 - 1e-7)
            threshold = np.log(need / (1.0 - need))  # the logit z at which it does
        else:  # softmax is monotone in the logits: the new logit must beat the k-th best old logit
            threshold = np.sort(logits, axis=1)[:, -min(top_k, logits.shape[1])]
        offsets = common.min() > 0.0  # without a positive common component there is no offset (b = 0)
        c, a, b, tpr, fpr = _choose_row(base, projection, common if offsets else None, threshold, is_new)
        start = weights[layer].mean(0) + a * directions[layer][c] - (b if offsets else 0.0) * centres[layer]
        row, tpr, fpr = _fit_row(start, np.concatenate(store["x"]), threshold, is_new)
        if not np.isfinite(row).all():  # a fit on extreme activations diverged: keep the centroid start (always finite)
            row = start.numpy()
        result.rows[layer] = row
        result.new_top_k.append(tpr)
        result.old_top_k.append(fpr)
    del model
    return result
