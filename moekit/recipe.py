"""Recipes: one YAML file describing a whole BTX run, validated before any work starts.

A recipe names the seed, the domains and their data, and each stage's options. Unknown keys
are errors (a typo must not be silently ignored), modes are literals, relative paths are
relative to the recipe file, and ``key=value`` overrides on the command line replace any value
by its dotted path (``train.max_steps=200``). Validation errors name the line of the YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moekit.config import HyperMoESettings, LoopSettings
from moekit.errors import MoekitError
from moekit.launch_spec import STAGE_KINDS, LauncherSpec

RECIPE_VERSION = 1
STAGES = STAGE_KINDS


class RecipeError(MoekitError):
    """A recipe that cannot be read or does not validate."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf or nan in an option is always a mistake


class SeedSpec(_Strict):
    """The dense seed: an existing model, or one moekit builds (``build``)."""

    path: str | None = Field(None, description="a local model directory or a hub id")
    build: Literal["tiny-random", "pretrained-small"] | None = Field(None, description="build a seed locally")
    size: Literal["tiny", "small"] = "small"
    pretrain: LoopSettings | None = Field(None, description="pretraining of a built seed (pretrained-small)")
    pretrain_data: list[str] = Field(default_factory=list, description="pretraining data (default: all domains' data)")

    @model_validator(mode="after")
    def _one_source(self) -> SeedSpec:
        if (self.path is None) == (self.build is None):
            raise ValueError("give exactly one of seed.path or seed.build")
        if self.build == "pretrained-small" and self.pretrain is None:
            raise ValueError("seed.build pretrained-small needs seed.pretrain (e.g. max_steps, lr, seq_len)")
        return self


class BranchTrainStage(LoopSettings):
    """Options of ``train`` (the branches): the loop settings, and what learns."""

    train: Literal["all", "ffn", "ffn+norms"] = Field(
        "all", description="all, or only the FFNs (attention and embeddings stay the seed's)"
    )

    def loop(self) -> LoopSettings:
        """The loop settings alone."""
        return LoopSettings.model_validate(self.model_dump(exclude={"train"}))


class DomainSpec(_Strict):
    """One domain: its training data and optional held-out data."""

    data: list[str] = Field(min_length=1)
    val_data: list[str] = Field(default_factory=list)


class MixStage(_Strict):
    """Options of ``mix`` (see ``moekit mix --help``)."""

    seed_as: Literal["routed", "shared", "none"] = "routed"
    target: str | None = Field(None, description="MoE family to build (default: the seed family's)")
    split: int = Field(1, ge=1, le=64, description="fine-grained experts: each expert FFN cut into this many")
    average: Literal["uniform", "weighted", "seed"] = "uniform"
    weights: list[float] | None = None
    merge: Literal["mean", "task-arithmetic", "ties", "dare"] = "mean"
    merge_density: float = Field(1.0, gt=0, le=1)
    merge_scale: float = Field(1.0, gt=0, le=10)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    top_k: int = Field(2, ge=1)
    router: Literal["random", "centroid"] = "centroid"
    router_sharpness: float = Field(0.5, gt=0, lt=1)
    router_tokens: int = Field(8192, ge=16)
    random_seed: int = 0
    upcycle_experts: int | None = Field(
        None, ge=1, description="sparse upcycling baseline: this many copies of the seed FFN"
    )
    drop_fraction: float = Field(0.0, ge=0, le=1, description="drop-upcycling share (with upcycle_experts)")
    attention_experts: bool = Field(False, description="BAM: attention experts too (moekit's own model family)")
    attention_kv: Literal["shared", "expert"] = "shared"
    attention_top_k: int = Field(0, ge=0, description="0: soft routing over all attention experts")
    groups: int | None = Field(None, ge=1, description="group-limited routing: expert groups (e.g. glm4_moe)")
    topk_groups: int | None = Field(None, ge=1, description="group-limited routing: groups per token")

    def fingerprint(self) -> dict[str, Any]:
        """The options as fingerprinted; the attention-expert and group keys only when on, so runs of older recipes
        keep their fingerprints."""
        exclude = set() if self.attention_experts else {"attention_experts", "attention_kv", "attention_top_k"}
        return self.model_dump(
            mode="json", exclude=exclude | ({"groups", "topk_groups"} if self.groups is None else set())
        )

    @model_validator(mode="before")
    @classmethod
    def _old_seed_expert(cls, data: Any) -> Any:
        """Recipes written for moekit 0.1 say ``seed_expert: true/false``; that is ``seed_as: routed/none``."""
        if isinstance(data, dict) and "seed_expert" in data:
            data = dict(data)
            old = "routed" if data.pop("seed_expert") else "none"
            if data.setdefault("seed_as", old) != old:
                raise ValueError(f"seed_expert contradicts seed_as {data['seed_as']}; give only seed_as")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> MixStage:
        if self.upcycle_experts is not None and (
            self.router != "random" or self.average != "uniform" or self.weights or self.merge != "mean"
        ):
            raise ValueError(
                "with upcycle_experts, use router: random and no average/weights/merge (the experts are copies "
                "of one FFN)"
            )
        if self.upcycle_experts is None and self.drop_fraction:
            raise ValueError("drop_fraction only applies with upcycle_experts")
        if self.attention_experts and self.upcycle_experts is not None:
            raise ValueError("attention_experts needs branches (upcycled copies of the seed's attention are identical)")
        if not self.attention_experts and (self.attention_kv != "shared" or self.attention_top_k):
            raise ValueError("attention_kv and attention_top_k apply with attention_experts: true")
        if (self.weights is not None) != (self.average == "weighted"):
            raise ValueError("give weights exactly when average is weighted")
        return self


class TuneStage(_Strict):
    """Options of ``tune`` (see ``moekit tune --help``)."""

    train: Literal["all", "router", "router+attn", "all-but-experts", "new-expert+router", "hypermoe"] = "all"
    balance: Literal["switch", "btx", "bias", "none"] = "switch"
    aux_coef: float | None = Field(None, ge=0, description="default 0.01; 0 with balance bias")
    hypermoe: HyperMoESettings | None = Field(None, description="add HyperMoE before tuning (mix.target moekit_moe)")
    z_coef: float = Field(0.0, ge=0)
    balance_scope: Literal["micro", "global"] = "micro"
    bias_rate: float = Field(1e-3, gt=0, le=1)
    bias_rule: Literal["sign", "proportional"] = "sign"
    routing: Literal["topk", "switch", "soft", "noisy", "expert_choice", "hash", "sample_top1", "sbase"] = "topk"
    router_jitter: float | None = Field(None, gt=0, lt=1)
    capacity_factor: float | None = Field(None, gt=0)
    temperature: tuple[float, float] = (1.0, 0.5)
    mixture: dict[str, float] = Field(default_factory=dict)
    loop: LoopSettings

    def fingerprint(self) -> dict[str, Any]:
        """The options as fingerprinted; keys added later only when set, so runs of older recipes keep their
        fingerprints."""
        later = {"router_jitter", "hypermoe"}
        return self.model_dump(mode="json", exclude={key for key in later if getattr(self, key) is None})

    @model_validator(mode="after")
    def _scope(self) -> TuneStage:
        if self.balance_scope == "global" and self.balance != "switch":
            raise ValueError("balance_scope global only applies with balance switch")
        return self


class EvalStage(_Strict):
    """Options of ``eval`` and ``inspect`` at the end of the run."""

    seq_len: int | None = Field(None, ge=2, description="default: train.seq_len")
    max_tokens: int = Field(65536, ge=1)
    batch_size: int = Field(8, ge=1)


class Recipe(_Strict):
    """A whole run."""

    recipe_version: int = RECIPE_VERSION
    name: str
    workdir: Path = Field(description="holds seed/ (when built), data/ (built-in data) and run/ (the run directory)")
    seed: SeedSpec
    domains: dict[str, DomainSpec] = Field(min_length=1)
    val_fraction: float = Field(0.05, ge=0, lt=1)
    text_field: str = "text"
    train: BranchTrainStage | None = None
    mix: MixStage = Field(default_factory=MixStage)
    tune: TuneStage | None = None
    eval: EvalStage = Field(default_factory=EvalStage)
    stages: list[
        Literal["seed", "branch", "train", "mix", "average", "tune", "dense", "upcycle", "eval", "inspect"]
    ] = Field(
        default_factory=lambda: list(STAGES),
        description="dense and upcycle are the equal-compute baselines (they need train and tune)",
    )
    launcher: LauncherSpec = Field(default_factory=LauncherSpec, description="where the stages run")

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.recipe_version > RECIPE_VERSION:
            raise ValueError(f"recipe_version {self.recipe_version} is newer than this moekit reads ({RECIPE_VERSION})")
        if "tune" in self.stages and self.tune is None:
            raise ValueError("the stages include tune but the recipe has no tune section")
        if "train" in self.stages and self.train is None:
            raise ValueError("the stages include train but the recipe has no train section")
        mixture = self.tune.mixture if self.tune else {}
        if mixture and set(mixture) != set(self.domains):
            raise ValueError(
                f"tune.mixture must give a share for every domain ({sorted(self.domains)}), got {sorted(mixture)}"
            )
        own_family = self.mix.target == "moekit_moe" or (self.mix.target is None and self.mix.attention_experts)
        if self.tune is not None and self.tune.hypermoe is not None and not own_family:
            raise ValueError(
                "tune.hypermoe needs an MoE of moekit's own family: set mix.target: moekit_moe (or "
                "mix.attention_experts: true)"
            )
        experts = self.mix.upcycle_experts or len(self.domains) + int(self.mix.seed_as == "routed")
        if self.mix.top_k > experts:
            raise ValueError(f"mix.top_k {self.mix.top_k} exceeds the {experts} experts this recipe makes")
        one_domain = len(self.domains) < 2 and not self.mix.upcycle_experts
        if "mix" in self.stages and self.mix.router == "centroid" and one_domain:
            raise ValueError(
                "mix.router centroid needs at least two domains (a router row is a domain's mean minus the mean "
                "over domains); use mix.router: random with one domain"
            )
        if self.mix.weights is not None and len(self.mix.weights) != len(self.domains):
            raise ValueError(f"mix.weights needs one weight per domain ({len(self.domains)})")
        self.launcher.check_stage_names(list(self.domains))
        from moekit.manifest import validate_branch_names

        try:
            validate_branch_names(list(self.domains))
        except MoekitError as exc:
            raise ValueError(f"{exc.message} {exc.hint}")
        return self


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(
                f"Override {dotted}: '{key}' is not a section.",
                "Override a value inside a section, e.g. train.max_steps=200.",
            )
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """Apply ``key.path=value`` overrides (values parsed as YAML: numbers, booleans, lists).

    A ``workdir`` given on the command line is relative to the current directory (as a user
    typing it expects), not to the recipe file.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(
                f"Override '{item}' is not KEY=VALUE.", "Write e.g. train.max_steps=200 or tune.loop.lr=1e-4."
            )
        value = yaml.safe_load(raw)
        if key.strip() == "workdir" and isinstance(value, str):
            value = str(Path(value).absolute())
        _set_dotted(data, key.strip(), value)


def _line_of(root: yaml.Node | None, location: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at ``location`` (the deepest existing one)."""
    node, line = root, None
    for key in location:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make relative data, seed and run paths relative to the recipe file's directory."""

    def fix(spec: str) -> str:
        if ":" in spec.split("/")[0] or Path(spec).is_absolute():
            return spec  # builtin:, hf: or absolute
        return str((base / spec).resolve())

    for domain in recipe.domains.values():
        domain.data = [fix(s) for s in domain.data]
        domain.val_data = [fix(s) for s in domain.val_data]
    recipe.seed.pretrain_data = [fix(s) for s in recipe.seed.pretrain_data]
    if recipe.seed.path and (base / recipe.seed.path).exists():
        recipe.seed.path = str((base / recipe.seed.path).resolve())
    if not recipe.workdir.is_absolute():
        recipe.workdir = (base / recipe.workdir).resolve()
    return recipe


def _check_seed(recipe: Recipe, root: yaml.Node | None, path: Path) -> None:
    """A seed path that is no hub id (org/name) must exist here, before any work starts."""
    from moekit.io.source import looks_like_hub_id

    seed = recipe.seed.path
    if seed and not Path(seed).expanduser().exists() and not looks_like_hub_id(seed):
        where = f"{path}:{_line_of(root, ('seed', 'path')) or '?'}: seed.path"
        raise RecipeError(
            f"{where}: the seed {seed} does not exist.", "Give an existing model directory or a hub id (org/name)."
        )


def _check_data(recipe: Recipe, root: yaml.Node | None, path: Path) -> None:
    """Every local data path exists and every built-in name is known, before any work starts."""
    from moekit.builtin_data import BUILTIN_PREFIX, builtin_names
    from moekit.data import HUB_PREFIX, expand_data_paths, parse_hub_spec
    from moekit.errors import DataError

    places = [
        (("domains", d, key, i), spec)
        for d, dom in recipe.domains.items()
        for key in ("data", "val_data")
        for i, spec in enumerate(getattr(dom, key))
    ]
    places += [(("seed", "pretrain_data", i), spec) for i, spec in enumerate(recipe.seed.pretrain_data)]
    for location, spec in places:
        where = f"{path}:{_line_of(root, location) or '?'}: {'.'.join(map(str, location))}"
        if spec.startswith(BUILTIN_PREFIX):
            if spec.removeprefix(BUILTIN_PREFIX) not in builtin_names():
                raise RecipeError(
                    f"{where}: unknown built-in data '{spec}'.",
                    f"Use one of: {', '.join('builtin:' + n for n in builtin_names())}.",
                )
        elif spec.startswith(HUB_PREFIX):
            try:
                parse_hub_spec(spec)
            except DataError as exc:
                raise RecipeError(f"{where}: {exc.message}", exc.hint)
        else:
            try:
                expand_data_paths(spec)
            except DataError as exc:
                raise RecipeError(f"{where}: {exc.message}", exc.hint)


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError naming the line and the fix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except OSError as exc:
        raise RecipeError(f"Cannot read recipe {path}: {exc}.", "Check the path.")
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}", "Fix the YAML syntax at the line shown.")
    if not isinstance(data, dict):
        raise RecipeError(f"{path} does not hold a mapping of recipe keys.", "See recipes/ for examples.")
    apply_overrides(data, overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            line = _line_of(root, error["loc"])
            where = ".".join(map(str, error["loc"])) or "recipe"
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key (a typo?)"
            problems.append(f"{path}:{line or '?'}: {where}: {message}")
        raise RecipeError(
            "The recipe does not validate:\n" + "\n".join(problems),
            "Fix the keys and values listed (see recipes/ and docs/recipes.md).",
        )
    recipe = _resolve_paths(recipe, path.parent.resolve())
    _check_seed(recipe, root, path)
    _check_data(recipe, root, path)
    return recipe
