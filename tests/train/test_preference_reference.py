"""Precomputed reference log-probs: equal to the live reference, cached, reused, invalidated."""

from __future__ import annotations

import copy
import hashlib

import preference_helpers as h
import pytest
import torch

from spo_align.data.collate import PairCollator
from spo_align.losses.registry import build_pair_loss
from spo_align.losses.spo import SPOLoss
from spo_align.train.logps import batch_logps
from spo_align.train.preference_trainer import PreferenceTrainer, ReferenceSpec
from spo_align.train.reference import ReferenceCache, ReferenceCacheError, adapter_disabled, make_key

torch.set_num_threads(1)
REL = 1e-5
SETTINGS = {"max_length": 128, "layout": "packed_rows", "pack_length": 128}


@pytest.fixture(scope="module")
def tok():
    return h.tokenizer()


@pytest.fixture(scope="module")
def ds(tok):
    return h.tokenized_dataset(tok, 12, seed=5)


def _trainer(tok, ds, out, model, reference, **args):
    return PreferenceTrainer(
        model=model,
        args=h.training_args(out, **args),
        train_dataset=ds,
        data_collator=PairCollator(tok.pad_token_id, "packed_rows", pack_length=128),
        processing_class=tok,
        pair_loss=build_pair_loss(SPOLoss(type="spo")),
        reference=reference,
    )


def _precomputed(cache_dir, adapter: bool) -> ReferenceSpec:
    return ReferenceSpec(kind="precomputed", cache_dir=cache_dir, adapter=adapter, settings=dict(SETTINGS))


def _live_table(model, ds, tok, adapter: bool) -> torch.Tensor:
    """Reference log-probs as the live reference computes them, one padded batch of every pair."""
    batch = PairCollator(tok.pad_token_id, "padded")([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        if adapter:
            with adapter_disabled(model):
                logps = batch_logps(model, batch)
        else:
            logps = batch_logps(model, batch)
    n = len(ds)
    return torch.stack([logps[:n], logps[n:]], dim=1)


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_precomputed_equals_live_reference(tok, ds, tmp_path, adapter):
    model = h.model(tok, spread=0.2)
    frozen = copy.deepcopy(model).eval()
    if adapter:
        model = h.lora(model)
    expected = _live_table(model if adapter else frozen, ds, tok, adapter)
    trainer = _trainer(tok, ds, tmp_path / "run", model, _precomputed(tmp_path / "cache", adapter))
    trainer.train()
    table = trainer._tables["train"]
    assert _rel(table, expected) < REL
    if adapter:  # the adapter really changes the outputs, so disabling it mattered
        with torch.no_grad():
            assert _rel(_live_table(model, ds, tok, adapter=False), expected) > 1e-3
    # Training used it: no reference model, one precompute forward per micro-batch (12 pairs / 4).
    assert trainer.reference_forwards == 3
    assert trainer.state.log_history[0]["both_below_ref"] >= 0.0


def test_resume_and_second_run_read_the_cache(tok, ds, tmp_path):
    cache = tmp_path / "cache"
    first = _trainer(tok, ds, tmp_path / "run", h.model(tok), _precomputed(cache, False),
                     save_strategy="steps", save_steps=1, max_steps=2)
    first.train()
    assert first.reference_forwards == 3
    assert len(list(cache.glob("*.pt"))) == 1

    # Resume from checkpoint-1 with a fresh model (starting weights again): reads, does not recompute.
    resumed = _trainer(tok, ds, tmp_path / "run", h.model(tok), _precomputed(cache, False),
                       save_strategy="steps", save_steps=1, max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert resumed.reference_forwards == 0
    assert resumed.state.global_step == 3

    second = _trainer(tok, ds, tmp_path / "run2", h.model(tok), _precomputed(cache, False))
    second.train()
    assert second.reference_forwards == 0
    assert torch.equal(second._tables["train"], first._tables["train"])


def test_resume_without_cache_and_without_the_starting_weights_refuses_for_full_finetuning(tok, ds, tmp_path):
    _trainer(tok, ds, tmp_path / "run", h.model(tok), _precomputed(tmp_path / "cache", False),
             save_strategy="steps", save_steps=1, max_steps=1).train()
    resumed = _trainer(tok, ds, tmp_path / "run", h.model(tok), _precomputed(tmp_path / "other", False), max_steps=2)
    with pytest.raises(ReferenceCacheError, match=r"are not in .*other \(the folder is gone\), and this run has no way"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))


def _with_start(cache_dir, load) -> ReferenceSpec:
    spec = _precomputed(cache_dir, False)
    spec.starting_model, spec.starting_path = load, "/models/start"
    return spec


def test_a_deleted_cache_is_computed_again_from_the_starting_weights_when_continued(tok, ds, tmp_path, caplog):
    import shutil

    cache = tmp_path / "cache"
    first = _trainer(tok, ds, tmp_path / "run", h.model(tok), _precomputed(cache, False),
                     save_strategy="steps", save_steps=1, max_steps=1)
    first.train()
    shutil.rmtree(cache)  # reference_logps/ deleted by hand
    caplog.set_level("WARNING", logger="spo_align.train.preference_trainer")
    resumed = _trainer(tok, ds, tmp_path / "run", h.model(tok), _with_start(cache, lambda: h.model(tok)), max_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert resumed.reference_forwards == 3 and resumed.state.global_step == 2
    assert torch.equal(resumed._tables["train"], first._tables["train"])  # the same starting weights, the same table
    said = [r.getMessage() for r in caplog.records]
    assert any("are not in" in m and "(the folder is gone)" in m and "computing them again from the starting "
               "weights /models/start" in m for m in said), said
    assert not any("starting weights are gone" in m for m in said)
    assert len(list(cache.glob("*.pt"))) == 1  # and cached again


@pytest.mark.parametrize(
    ("load", "said"),
    [
        (lambda tok: h.model(tok, seed=3), "are not those this run started from"),
        (lambda tok: (_ for _ in ()).throw(OSError("no such folder")), "cannot be loaded to compute them again"),
    ],
    ids=["changed-since", "missing"],
)
def test_starting_weights_that_changed_or_are_missing_are_named(tok, ds, tmp_path, load, said):
    _trainer(tok, ds, tmp_path / "run", h.model(tok), _precomputed(tmp_path / "cache", False),
             save_strategy="steps", save_steps=1, max_steps=1).train()
    resumed = _trainer(tok, ds, tmp_path / "run", h.model(tok), _with_start(tmp_path / "other", lambda: load(tok)),
                       max_steps=2)
    with pytest.raises(ReferenceCacheError, match=said) as exc:
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert "/models/start" in str(exc.value) and "--overwrite" in str(exc.value)


def test_changed_data_or_max_length_invalidates(tok, ds, tmp_path):
    model = h.model(tok)
    key = make_key(model, tok, ds, SETTINGS)
    assert make_key(model, tok, ds, dict(SETTINGS)) == key
    other_data = h.tokenized_dataset(tok, 12, seed=6)
    assert make_key(model, tok, other_data, SETTINGS).data != key.data
    assert make_key(model, tok, ds, {**SETTINGS, "max_length": 64}).digest != key.digest
    changed = h.model(tok)
    with torch.no_grad():
        next(changed.parameters())[0, 0] += 1e-3
    assert make_key(changed, tok, ds, SETTINGS).model != key.model

    cache = tmp_path / "cache"
    first = _trainer(tok, ds, tmp_path / "a", h.model(tok), _precomputed(cache, False), max_steps=1)
    first.train()
    key = first._keys["train"]  # the settings plus the run's grouping (test_reference_grouping.py)
    again = _trainer(tok, other_data, tmp_path / "b", h.model(tok), _precomputed(cache, False), max_steps=1)
    again.train()
    assert again.reference_forwards == 3  # recomputed for the new data
    spec = _precomputed(cache, False)
    spec.settings = {**SETTINGS, "max_length": 64}
    third = _trainer(tok, ds, tmp_path / "c", h.model(tok), spec, max_steps=1)
    third.train()
    assert third.reference_forwards == 3
    assert len(list(cache.glob("*.pt"))) == 3
    # A file whose stored key differs (e.g. copied over) is not trusted.
    rc = ReferenceCache(cache)
    path = rc.path(key, "train")
    stored = torch.load(path, weights_only=True)
    stored["key"]["data"] = "0" * 64
    torch.save(stored, path)
    rc.checksum_path(path).write_text(hashlib.sha256(path.read_bytes()).hexdigest())  # intact, other key
    assert rc.load(key, "train") is None
    assert path.is_file()  # not damaged: kept for the key it was written for


@pytest.mark.parametrize("damage", ["truncated", "garbage", "zero-length", "no checksum"])
def test_a_damaged_cache_file_is_reported_deleted_and_computed_again(tok, ds, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    first = _trainer(tok, ds, tmp_path / "a", h.model(tok), _precomputed(cache, False), max_steps=1)
    first.train()
    (path,) = cache.glob("*.pt")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a torch file" * 50)
    elif damage == "zero-length":
        path.write_bytes(b"")
    else:
        ReferenceCache.checksum_path(path).unlink()
    caplog.set_level("WARNING", logger="spo_align.train.reference")
    again = _trainer(tok, ds, tmp_path / "b", h.model(tok), _precomputed(cache, False), max_steps=1)
    again.train()
    assert again.reference_forwards == 3  # computed again, not read
    assert any("is damaged" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert torch.equal(again._tables["train"], first._tables["train"])
    third = _trainer(tok, ds, tmp_path / "c", h.model(tok), _precomputed(cache, False), max_steps=1)
    third.train()
    assert third.reference_forwards == 0  # the new file is whole


def test_live_lora_reference_uses_no_second_model(tok, ds, tmp_path):
    model = h.lora(h.model(tok, spread=0.2))
    trainer = _trainer(tok, ds, tmp_path / "run", model, ReferenceSpec(kind="adapter"), max_steps=1)
    trainer.train()
    assert trainer.reference_forwards == 1
    assert trainer.state.log_history[0]["loss"] > 0


def test_separate_reference_model_is_used_for_the_pass_then_released(tok, ds, tmp_path):
    policy = h.model(tok, seed=0, spread=0.2)
    other = h.model(tok, seed=7, spread=0.2)
    expected = _live_table(copy.deepcopy(other), ds, tok, adapter=False)
    spec = _precomputed(tmp_path / "cache", False)
    spec.model = other
    trainer = _trainer(tok, ds, tmp_path / "run", policy, spec, max_steps=1)
    trainer.train()
    assert _rel(trainer._tables["train"], expected) < REL
    assert trainer.reference.model is None
    # The key follows the reference model, not the policy: a run with the policy as reference differs.
    assert trainer._keys["train"].model != make_key(h.model(tok, seed=0, spread=0.2), tok, ds, SETTINGS).model
