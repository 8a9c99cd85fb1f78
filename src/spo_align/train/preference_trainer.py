"""The preference trainer: `transformers.Trainer` with our pair losses, padded or packed batches.

Not TRL's DPOTrainer: its tokenization and batching fight packing and its loss types do not match the
paper. The Trainer supplies the loop (optimizer, scheduler, DeepSpeed, checkpoints, resume, callbacks);
this subclass supplies `compute_loss`, evaluation, metric averaging and the reference log-probs.

The loss is any function over `PairInputs` (`spo_align.losses.registry.build_pair_loss`): policy sums and
token counts always, reference sums only when the loss needs them. Reference log-probs come from one of
(`ReferenceKind`):
- ``adapter``: the policy itself with its LoRA adapter disabled, under no_grad (no second copy);
- ``model``: a frozen copy (under ZeRO-3 wrapped as a DeepSpeed inference engine, so it is sharded too);
- ``precomputed``: a table computed once at train begin over the very micro-batches training runs (the
  trainer's own dataloader; `FixedOrderSampler` keeps them the same every epoch), cached under the output
  folder and read back on resume or by a second run with the same key; no reference in memory;
- ``none``: a reference-free loss (SimPO): no reference model, table or forward at all.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from spo_align.losses.pair import PairInputs, PairLoss, PairLossFn
from spo_align.train.logps import batch_logps, batch_token_counts
from spo_align.train.reference import (
    CacheKey,
    ReferenceCache,
    ReferenceCacheError,
    compute_reference_table,
    make_key,
    model_fingerprint,
)
from spo_align.train.sequence_logps import DEFAULT_CHUNK_SIZE

logger = logging.getLogger(__name__)

ReferenceKind = Literal["adapter", "model", "precomputed", "none"]


@dataclass
class ReferenceSpec:
    kind: ReferenceKind
    model: nn.Module | None = None
    """The frozen reference model (kind ``model``; kind ``precomputed`` when the recipe names a separate
    reference model: used for the pass, then released)."""
    cache_dir: Path | None = None
    """Where precomputed tables live (kind ``precomputed``)."""
    adapter: bool = False
    """Precomputed from the policy with its adapter disabled (LoRA) rather than as it starts (full FT)."""
    settings: dict[str, Any] | None = None
    """Layout settings that enter the cache key (max_length, layout, pack_length)."""
    starting_model: Callable[[], nn.Module] | None = None
    """Loads the policy's starting weights again (full fine-tuning, kind ``precomputed``): a continued run whose
    tables are gone (its `reference_logps/` deleted) recomputes them from it."""
    starting_path: str | None = None
    """Where `starting_model` loads from, for messages."""


class FixedOrderSampler(torch.utils.data.Sampler[int]):
    """The training pairs in one seeded random order, the same in every epoch, so that every micro-batch holds
    the same pairs in every epoch (the dataloader cuts the order into consecutive micro-batches; accelerate
    deals them out to the ranks). A precomputed reference table, computed over these very micro-batches,
    then matches training exactly in every epoch; with a fresh order per epoch it could match only one."""

    def __init__(self, num_pairs: int, seed: int) -> None:
        self.num_pairs = num_pairs
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        return iter(torch.randperm(self.num_pairs, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_pairs


class _PrecomputeAtTrainBegin(TrainerCallback):
    """Computes missing reference tables once the model is wrapped (ZeRO-3 needs the engine's hooks)."""

    def __init__(self, trainer: PreferenceTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.ensure_reference_tables(resumed=state.global_step > 0)


def _prepare_deepspeed_reference(model: nn.Module, accelerator: Any) -> nn.Module:
    """Wrap a frozen reference as a DeepSpeed inference engine with the run's ZeRO config (stage 3 stays
    sharded; other stages keep a full copy per rank, ZeRO-0)."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        config["zero_optimization"] = {"stage": 0}
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


class PreferenceTrainer(Trainer):
    """A `Trainer` for pairwise preference losses (the catalogue's stage "pair") over collated pair batches."""

    def __init__(
        self,
        *args: Any,
        pair_loss: PairLossFn,
        reference: ReferenceSpec,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # compute_loss returns the mean over the micro-batch's pairs: the Trainer must divide by the
        # accumulation steps itself (it skips that when it thinks the model normalised by item count).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.pair_loss = pair_loss
        self.reference = reference
        self.chunk_size = chunk_size
        self.reference_forwards = 0
        """Reference forward passes run by this trainer (live or precompute); tests count them."""
        self.real_tokens = 0
        """Non-pad tokens of the policy's training forwards on this rank."""
        self._total_train_tokens = 0
        """Real tokens trained by all ranks since the run began, counted at every micro-batch and logged as
        `num_tokens` like TRL's trainers (a continued run restores it: `callbacks.LoggingWindow`, `callbacks.restore_token_count`)."""
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._tables: dict[str, torch.Tensor] = {}
        self._keys: dict[str, CacheKey] = {}
        if reference.kind == "model" and reference.model is None:
            raise ValueError("reference kind 'model' needs the reference model")
        if reference.kind == "none" and reference.model is not None:
            raise ValueError("reference kind 'none' takes no reference model")
        if reference.model is not None:
            if self.is_deepspeed_enabled:
                reference.model = _prepare_deepspeed_reference(reference.model, self.accelerator)
            else:
                reference.model = reference.model.to(self.args.device).eval().requires_grad_(False)
        if reference.kind == "precomputed":
            if reference.cache_dir is None:
                raise ValueError("reference kind 'precomputed' needs cache_dir")
            self.add_callback(_PrecomputeAtTrainBegin(self))

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """With a precomputed reference: one seeded order of the pairs, the same every epoch (`FixedOrderSampler`),
        so the table matches the micro-batches trained on. Otherwise the Trainer's own (reshuffled every epoch)."""
        if self.reference.kind != "precomputed":
            return super()._get_train_sampler(train_dataset)
        ds = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return FixedOrderSampler(len(ds), seed)

    # ------------------------------------------------------------------ reference

    def _splits(self) -> dict[str, Any]:
        splits = {"train": self.train_dataset}
        if self.eval_dataset is not None:
            splits["eval"] = self.eval_dataset
        return splits

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        if self.reference.kind == "precomputed":
            # Keys are taken now, from the weights the run starts from: train() loads a checkpoint's weights.
            self.read_reference_tables()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def read_reference_tables(self) -> None:
        """Take the cache keys from the starting weights and read any cached tables."""
        assert self.reference.cache_dir is not None
        cache = ReferenceCache(Path(self.reference.cache_dir))
        for split, ds in self._splits().items():
            if split in self._tables:
                continue
            source = self.reference.model if self.reference.model is not None else self.model
            settings = {**(self.reference.settings or {}), **self._grouping(split)}
            self._keys[split] = make_key(source, self.processing_class, ds, settings)
            table = cache.load(self._keys[split], split)
            if table is not None:
                self._tables[split] = table

    def _grouping(self, split: str) -> dict[str, Any]:
        """What decides the micro-batches and precision of `split`, and so the bits of its table: the batch
        size, the order's seed (train) and the mixed precision. Part of the cache key."""
        args = self.args
        batch = args.per_device_train_batch_size if split == "train" else args.per_device_eval_batch_size
        seed = args.data_seed if args.data_seed is not None else args.seed
        return {"batch_size": batch, "order_seed": seed if split == "train" else None,
                "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "none"}

    def ensure_reference_tables(self, *, resumed: bool) -> None:
        """Compute (and cache) every missing table. Called at train begin, on every rank."""
        missing = [s for s in self._splits() if s not in self._tables]
        if not missing:
            self._release_reference_model()
            return
        assert self.reference.cache_dir is not None
        cache = ReferenceCache(Path(self.reference.cache_dir))
        starting = None
        if resumed and not self.reference.adapter and self.reference.model is None:
            # the policy holds the checkpoint's weights now: the starting weights are loaded again from their folder
            starting = self._starting_model_again(missing)
        separate = self.reference.model is not None or starting is not None
        if starting is not None:
            model = starting
        elif separate:
            model = self.reference.model
        else:
            model = self.model_wrapped if self.model_wrapped is not None else self.model
        for split in missing:
            ds = self._splits()[split]
            # The micro-batches training (evaluation) will run, built by the same dataloader code: in bf16 a
            # sequence's log-prob depends on its companions, so step-0 log-ratios are exactly 0 only this way.
            batches = self.get_train_dataloader() if split == "train" else self.get_eval_dataloader(ds)
            logger.info("precomputing reference log-probs for %d %s pairs", len(ds), split)
            with self.accelerator.autocast():  # the precision of training (see compute_loss_context_manager)
                table = compute_reference_table(
                    model,
                    batches,
                    len(ds),
                    device=self.args.device,
                    disable_adapter=self.reference.adapter and not separate,
                    world_size=self.args.world_size,
                    on_forward=self._count_reference_forward,
                )
            if self.args.process_index == 0:
                cache.save(self._keys[split], split, table)
            self._tables[split] = table
        self.accelerator.wait_for_everyone()
        self._release_reference_model()

    def _starting_model_again(self, missing: list[str]) -> nn.Module:
        """The starting weights, loaded again and checked to be those the run started from (their fingerprint is
        the cache key's), prepared like a frozen reference; `ReferenceCacheError` when they cannot be."""
        cache_dir = Path(self.reference.cache_dir)  # type: ignore[arg-type]
        gone = (
            f"the reference log-probs of this continued run ({', '.join(missing)}) are not in {cache_dir}"
            f"{'' if cache_dir.is_dir() else ' (the folder is gone)'}"
        )
        path = self.reference.starting_path or "the starting model"
        if self.reference.starting_model is None:
            raise ReferenceCacheError(f"{gone}, and this run has no way to load its starting weights again; pass "
                                      "--overwrite to start the run over")
        logger.warning("%s (deleted or moved?): computing them again from the starting weights %s", gone, path)
        try:
            model = self.reference.starting_model()
        except Exception as exc:  # noqa: BLE001 - any failure to load is one line: what, where, what to do
            raise ReferenceCacheError(
                f"{gone}, and the starting weights {path} cannot be loaded to compute them again ({type(exc).__name__}: "
                f"{exc}); put them back, or pass --overwrite to start the run over"
            ) from None
        fingerprint = model_fingerprint(model)
        if any(self._keys[split].model != fingerprint for split in missing):
            raise ReferenceCacheError(
                f"{gone}, and the starting weights {path} are not those this run started from (they changed since); "
                "put those back, or pass --overwrite to start the run over"
            )
        if self.is_deepspeed_enabled:
            return _prepare_deepspeed_reference(model, self.accelerator)
        return model.to(self.args.device).eval().requires_grad_(False)

    def _release_reference_model(self) -> None:
        if self.reference.kind == "precomputed" and self.reference.model is not None:
            self.reference.model = None  # training holds no reference model
            logger.info("separate reference model released: its log-probs are precomputed")

    def _count_reference_forward(self) -> None:
        self.reference_forwards += 1

    def reference_logps(self, model: nn.Module, inputs: dict[str, Any], split: str) -> torch.Tensor:
        """[2B] reference log-probs (chosen then rejected) for the batch."""
        kind = self.reference.kind
        if kind == "precomputed":
            if split not in self._tables:
                raise ReferenceCacheError(f"no precomputed reference log-probs for the {split} split")
            rows = self._tables[split][inputs["pair_index"].cpu()]
            return torch.cat([rows[:, 0], rows[:, 1]]).to(inputs["input_ids"].device)
        self.reference_forwards += 1
        with torch.no_grad():
            if kind == "adapter":
                from spo_align.train.reference import adapter_disabled, evaluation_mode

                with adapter_disabled(model), evaluation_mode(model):
                    return batch_logps(model, inputs, chunk_size=self.chunk_size)
            assert self.reference.model is not None
            return batch_logps(self.reference.model, inputs, chunk_size=self.chunk_size)

    # ------------------------------------------------------------------ loss

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        """The Trainer's context for `compute_loss`, plus accelerate's autocast (a no-op without mixed precision).

        accelerate applies autocast by wrapping the model's ``forward``; `batch_logps` runs the causal LM's
        forward in its place, so a model that is itself the causal LM (full fine-tuning) would run outside it.
        Policy and reference log-probs thus both run under the same autocast here.
        """
        stack = super().compute_loss_context_manager()
        stack.enter_context(self.accelerator.autocast())
        return stack

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        split = "train" if model.training else "eval"
        policy = batch_logps(model, inputs, chunk_size=self.chunk_size)
        tokens = batch_token_counts(inputs)
        b = policy.shape[0] // 2
        ref_chosen = ref_rejected = None
        if self.reference.kind != "none":  # a reference-free loss runs no reference forward at all
            reference = self.reference_logps(model, inputs, split).to(policy.dtype)
            ref_chosen, ref_rejected = reference[:b], reference[b:]
        pairs = PairInputs(policy[:b], policy[b:], tokens[:b], tokens[b:], ref_chosen, ref_rejected)
        out = self.pair_loss(pairs)
        loss = out.losses.mean()
        real_tokens = None
        if split == "train":
            real_tokens = int(inputs["num_real_tokens"])
            self.real_tokens += real_tokens
        self._record(split, pairs, out, real_tokens)
        return (loss, {"chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards}) if return_outputs else loss

    def _record(self, split: str, pairs: PairInputs, out: PairLoss, real_tokens: int | None = None) -> None:
        """The step's metrics (`losses.registry.logged_metrics`); both_below_ref only where a reference exists.

        One gather per micro-batch carries every metric (averaged over the ranks) and, in training, this rank's
        real tokens (summed over the ranks into `num_tokens`; exact in fp32 below 2**24 tokens per micro-batch)."""
        pc, pr = pairs.policy_chosen.detach(), pairs.policy_rejected.detach()
        values = {
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "logps/chosen": pc,
            "logps/rejected": pr,
        }
        if pairs.ref_chosen is not None and pairs.ref_rejected is not None:
            values["both_below_ref"] = ((pc < pairs.ref_chosen) & (pr < pairs.ref_rejected)).float()
        for name, term in out.terms.items():
            values[name] = term
        names = sorted(values)
        row = [values[n].detach().float().mean() for n in names]
        if real_tokens is not None:
            row.append(torch.tensor(float(real_tokens), device=row[0].device))
        rows = self.accelerator.gather(torch.stack(row).unsqueeze(0))  # one row per rank, never truncated
        if real_tokens is not None:
            self._total_train_tokens += int(rows[:, -1].sum().round().item())
        for name, value in zip(names, rows[:, : len(names)].mean(dim=0).tolist()):
            self._metrics[split][name].append(value)

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for name, values in self._metrics[split].items():
            if values:
                logs[prefix + name] = sum(values) / len(values)
        self._metrics[split].clear()
        if split == "train":
            logs["num_tokens"] = float(self._total_train_tokens)
        super().log(logs, start_time)
