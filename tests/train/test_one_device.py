"""One process trains on one device: a machine with several GPUs never gets the model wrapped in
`nn.DataParallel`, whose replicas would each compute the whole batch through the swapped forward of
`train/logps.py` and pair every sequence with itself.

This machine has no GPU, so the tests make the Trainer see two (`torch.cuda.device_count` answers 2 and
`use_cpu` is off), and stand in for `nn.DataParallel`'s forward with `ReplicatingDataParallel`, which does
on CPU what torch's does on GPUs: split the inputs along the batch, build each replica with torch's own
`Module._replicate_for_data_parallel` (as `torch.nn.parallel.replicate` does), run them, concatenate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import preference_helpers as h
import pytest
import torch
from torch import nn

from spo_align.data.collate import PairCollator
from spo_align.losses.registry import build_pair_loss
from spo_align.losses.spo import SPOLoss
from spo_align.train.preference_trainer import PreferenceTrainer, ReferenceSpec

torch.set_num_threads(1)


def _replicate(network: nn.Module) -> nn.Module:
    """One replica of `network`, built as `torch.nn.parallel.replicate` builds each (parameters shared on CPU)."""
    modules = list(network.modules())
    copies = {module: module._replicate_for_data_parallel() for module in modules}
    for module in modules:
        replica = copies[module]
        for key, child in module._modules.items():
            replica._modules[key] = copies[child] if child is not None else None
        for key, param in module._parameters.items():
            replica._parameters[key] = param
    return copies[network]


class ReplicatingDataParallel(nn.DataParallel):
    """`nn.DataParallel` over two replicas on CPU (torch's own scatter/replicate/gather need CUDA)."""

    replicas = 2

    def __init__(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.module = module
        self.device_ids = list(range(self.replicas))
        self.dim = 0

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        assert not inputs
        outputs = []
        for index in range(self.replicas):
            part = {key: value.chunk(self.replicas)[index] for key, value in kwargs.items()}
            outputs.append(_replicate(self.module)(**part))
        return torch.cat(outputs)


@pytest.fixture
def two_gpus_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Trainer sees two GPUs; a DataParallel it builds really splits the batch over two replicas."""
    import transformers.trainer

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(transformers.trainer.nn, "DataParallel", ReplicatingDataParallel)


@pytest.fixture(scope="module")
def tok():
    return h.tokenizer()


@pytest.fixture(scope="module")
def ds(tok):
    return h.tokenized_dataset(tok, 16, seed=3)


def _train(plan: Any, out: Path, tok: Any, ds: Any, *, lora: bool, use_cpu: bool) -> tuple[PreferenceTrainer, list]:
    """Two SGD steps of SPO through the recipe's own training arguments; returns the trainer and its logs."""
    from spo_align.train.args import build_training_args

    args = build_training_args(
        plan, out, use_cpu=use_cpu, remove_unused_columns=False, max_steps=2, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", save_strategy="no", report_to="none", dataloader_pin_memory=False,
    )
    model = h.model(tok, spread=0.2)
    reference = ReferenceSpec(kind="adapter") if lora else ReferenceSpec(kind="model", model=h.model(tok, spread=0.2))
    trainer = PreferenceTrainer(
        model=h.lora(model) if lora else model,
        args=args,
        train_dataset=ds,
        data_collator=PairCollator(tok.pad_token_id, "padded"),
        processing_class=tok,
        pair_loss=build_pair_loss(SPOLoss(type="spo", beta=1.0, alpha=1.0)),
        reference=reference,
    )
    trainer.train()
    return trainer, [r for r in trainer.state.log_history if "loss" in r]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_process_that_sees_two_gpus_trains_exactly_as_on_one_device(
    plan_for, tmp_path: Path, tok, ds, lora: bool, monkeypatch: pytest.MonkeyPatch
):
    plan = plan_for("spo", "training.per_device_batch_size=4", "output.report_to=[none]")
    _, want = _train(plan, tmp_path / "one", tok, ds, lora=lora, use_cpu=True)

    import transformers.trainer

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(transformers.trainer.nn, "DataParallel", ReplicatingDataParallel)
    # Wrapped in DataParallel, this run paired each sequence with itself (LoRA: every margin exactly 0,
    # so the margin term had no gradient) or failed on a shape (full fine-tuning: the reference is not wrapped).
    trainer, got = _train(plan, tmp_path / "two", tok, ds, lora=lora, use_cpu=False)
    assert want[-1]["rewards/margins"] != 0.0
    assert [r["rewards/margins"] for r in got] == [r["rewards/margins"] for r in want]
    assert got == want
    assert trainer.args.n_gpu == 1 and trainer.args.train_batch_size == 4
    assert not isinstance(trainer.model_wrapped, nn.DataParallel)


def test_every_stage_config_keeps_one_device_per_process(plan_for, tmp_path: Path, two_gpus_visible):
    from trl import KTOConfig, SFTConfig

    from spo_align.train.args import build_training_args

    plan = plan_for("spo", "training.per_device_batch_size=4", "output.report_to=[none]")
    for cls in (None, SFTConfig, KTOConfig):
        args = build_training_args(plan, tmp_path, cls, use_cpu=False)
        assert args.n_gpu == 1 and args.train_batch_size == 4, cls
        assert args.parallel_mode.value == "not_parallel"


def test_the_log_says_which_gpu_trains_and_how_to_use_the_others():
    from spo_align.train.args import device_message

    cuda0 = torch.device("cuda:0")
    assert device_message(cuda0, 4, 1) == (
        "training on cuda:0 (1 of 4 visible GPUs; use distributed.num_processes: 4 to use all)"
    )
    assert device_message(cuda0, 1, 1) == "training on cuda:0"
    assert device_message(torch.device("cuda:1"), 4, 4) == "training on cuda:1"
    assert device_message(torch.device("cpu"), 0, 1) == "training on cpu"


def test_training_args_pickle_into_checkpoints_and_load_back(plan_for, tmp_path: Path):
    from spo_align.train.args import build_training_args

    args = build_training_args(plan_for("spo", "output.report_to=[none]"), tmp_path)
    torch.save(args, tmp_path / "training_args.bin")
    loaded = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert type(loaded) is type(args) and loaded.learning_rate == args.learning_rate
