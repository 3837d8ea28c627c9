"""The fine-tunes' options, declared once (:class:`TuneOptions`): what ``lp``, ``ft-last``, ``lora`` and
``scratch-vit`` train, on what, and how long. ``probes scale / eval / finetune`` build their flags from
these fields, and the study functions take the object (``tune=``) or any field as a keyword."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embedcache.options import Interval, Options, option
from probes.errors import ProbeError

__all__ = ["TuneOptions", "HEADS_HELP", "LOSSES_HELP"]

HEADS_HELP = "fine-tune head: linear, linear-cls-mean, mlp, decoder"
LOSSES_HELP = "fine-tune loss: ce, focal, weighted-ce, weighted-focal, hierarchical-focal"


@dataclass(frozen=True)
class TuneOptions(Options):
    """How the fine-tune probes train (see :class:`probes.tuning.estimator.FineTuneProbe`)."""

    error = ProbeError

    tail_blocks: int | None = option(
        None,
        "fine-tunes (ft-last, lora) train the last K blocks on the tokens cached by embedcache extract "
        "--tail-blocks K (default: the one depth the store caches)",
    )
    blocks: int | str | None = option(
        None, "train from the images through the backbone: the last K blocks, or all", cli=False
    )
    head: str = option("linear", HEADS_HELP)
    loss: str = option("ce", LOSSES_HELP)
    gamma: float | None = option(
        None, "focal loss gamma (default 2; the hierarchy file's for hierarchical-focal)", check=Interval(float, 0)
    )
    hierarchy: Any = option(None, "YAML of lineages and penalties for --loss hierarchical-focal")
    epochs: int | None = option(
        None,
        "fine-tune epochs (default 50, the papers'; lp on small data: enough for 1,000 steps); the epoch with the "
        "lowest hold-out log-loss is kept",
        check=Interval(int, 1),
    )
    batch_size: int = option(256, "fine-tune minibatch size", check=Interval(int, 1))
    lr: float | None = option(
        None,
        "learning rate (default: lp 5e-4, ft-last / lora 1e-4, scratch-vit 1e-3)",
        check=Interval(float, 0, open_low=True),
    )
    weight_decay: float | None = option(
        None, "weight decay (default: lp 0, ft-last / lora 0.01, scratch-vit 0.05)", check=Interval(float, 0)
    )
    val_fraction: float = option(
        0.1,
        "fine-tunes: stratified hold-out of the training cells choosing the best epoch",
        check=Interval(float, 0, 1, open_low=True),
    )
    patience: int | None = option(
        None, "fine-tunes: stop after this many epochs without a better hold-out macro-F1", check=Interval(int, 1)
    )
    lora_rank: int = option(8, "LoRA rank", check=Interval(int, 1))
    lora_alpha: float = option(16.0, "LoRA alpha", check=Interval(float, 0, open_low=True))
    lora_dropout: float = option(0.0, "LoRA dropout", check=Interval(float, 0, 1))
    augment: Any = option(None, "training augmentations: flip,rot90,color,blur", cli=False)
    scratch_size: int = option(40, "scratch-vit's input size when the store has no working size", cli=False)

    def __post_init__(self) -> None:
        from probes.heads.tokens import TOKEN_HEADS
        from probes.tuning.augment import parse_augment
        from probes.tuning.losses import LOSSES, load_hierarchy

        super().__post_init__()
        if self.head not in TOKEN_HEADS:
            raise ProbeError(f"unknown head {self.head!r}; choose from {', '.join(TOKEN_HEADS)}")
        if self.loss not in LOSSES:
            raise ProbeError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.tail_blocks is not None and (isinstance(self.tail_blocks, bool) or int(self.tail_blocks) < 1):
            raise ProbeError(f"--tail-blocks must be >= 1, got {self.tail_blocks!r}")
        if self.blocks is not None and self.blocks != "all":
            try:
                object.__setattr__(self, "blocks", int(self.blocks))
            except (TypeError, ValueError):
                raise ProbeError(f"--blocks must be 'all' or a number of last blocks, got {self.blocks!r}") from None
        try:
            object.__setattr__(self, "augment", parse_augment(self.augment))
            if self.hierarchy is not None and not hasattr(self.hierarchy, "matrices"):
                object.__setattr__(self, "hierarchy", load_hierarchy(self.hierarchy))  # a bad file fails before a fit
        except ValueError as e:
            raise ProbeError(str(e)) from e
        if self.hierarchy is not None and self.loss != "hierarchical-focal":
            raise ProbeError(f"--hierarchy applies to --loss hierarchical-focal only, not {self.loss!r}")
        if self.loss == "hierarchical-focal" and self.hierarchy is None:
            raise ProbeError("--loss hierarchical-focal needs --hierarchy FILE (lineages and penalties, YAML)")

    def probe_params(self) -> dict[str, Any]:
        """Keywords of :class:`FineTuneProbe` these options set."""
        names = ("head", "loss", "gamma", "hierarchy", "epochs", "batch_size", "lr", "weight_decay") + (
            "val_fraction",
            "patience",
            "lora_rank",
            "lora_alpha",
            "lora_dropout",
        )
        return {n: getattr(self, n) for n in names}

    def as_dict(self) -> dict[str, Any]:
        """For ``study.json``."""
        out = super().as_dict()
        out["hierarchy"] = getattr(self.hierarchy, "source", None) if self.hierarchy is not None else None
        out["augment"] = list(self.augment)
        return out


POOLED_HEADS = ("linear", "mlp")  # heads lp trains on pooled features


def source_of(probe: str, o: TuneOptions) -> str:
    """What ``probe`` reads under the fine-tune options ``o``: ``features``, ``tokens`` or ``images``."""
    from probes.heads.registry import tune_probes

    if probe not in tune_probes():
        return "features"
    if probe == "scratch-vit":
        return "images"
    if o.blocks is not None:
        return "images"
    if probe == "lp" and o.head in POOLED_HEADS:
        return "features"
    return "tokens"


def token_need(probes: Any, options: TuneOptions | None) -> Any:
    """What a clean feature set lacks for ``probes`` that train on cached tail tokens (None: nothing, or no
    such probe): :func:`probes.features.cells.open_cells` resolves a backbone name with it."""
    from probes.features.cells import parse_names

    o = options or TuneOptions()
    if not any(source_of(p, o) == "tokens" for p in parse_names(probes)):
        return None

    def lacks(fs: Any) -> str | None:
        if o.tail_blocks is not None:
            try:
                fs.tokens(int(o.tail_blocks))  # the set's own check of its cached depths
            except Exception:  # noqa: BLE001  a StoreError naming the depths it has
                return f"no tail tokens for {o.tail_blocks} block(s)"
            return None
        return None if fs.token_sets else "no cached tail tokens (extract --tail-blocks K)"

    return lacks
