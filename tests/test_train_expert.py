"""Expert training on the tiny backbone: trains, lowers held-out loss, saves safetensors, registers,
tracks in MLflow; clear errors for bad input, leaving nothing registered."""

from __future__ import annotations

import json

import mlflow
import pytest

from core.errors import ConflictError, DataFormatError, InvalidNameError
from experts.adapters import load_lora_weights, validate_against
from experts.training import TrainConfig
from pipelines.train_expert import train_expert_from_file
from registry import repository as repo
from registry.db import session_factory


def test_train_expert_end_to_end(settings, backbone, domain_data):
    sessions = session_factory(settings)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    result = train_expert_from_file(
        settings, backbone, sessions, "medical", domain_data["medical"],
        config=TrainConfig(epochs=8, batch_size=4, learning_rate=3e-3),
    )
    assert result.expert_loss < result.base_loss
    assert (settings.experts_dir / "medical" / "v1" / "adapter_model.safetensors").is_file()
    assert not list(settings.experts_dir.glob("*.bin"))
    weights = load_lora_weights(result.adapter_path, "medical")
    validate_against(weights, backbone, settings)
    # the shared backbone is restored exactly
    after = backbone.model.state_dict()
    assert set(after) == set(before)
    assert all((after[k] == before[k]).all() for k in before)
    with sessions() as session:
        expert = repo.require_expert(session, "medical")
        assert expert.status == "unrouted" and expert.current_version == 1
        assert len(repo.routing_examples(session, ["medical"])) == 12
    run = mlflow.get_run(result.run_id)
    assert run.data.metrics["eval_loss_expert"] == pytest.approx(result.expert_loss)
    assert "train_loss" in run.data.metrics


def test_bad_inputs_register_nothing(settings, backbone, domain_data, tmp_path):
    sessions = session_factory(settings)
    with pytest.raises(InvalidNameError):
        train_expert_from_file(settings, backbone, sessions, "Bad Name", domain_data["medical"])
    with pytest.raises(InvalidNameError):
        train_expert_from_file(settings, backbone, sessions, "auto", domain_data["medical"])
    with pytest.raises(DataFormatError, match="does not exist"):
        train_expert_from_file(settings, backbone, sessions, "hr", tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n" + '{"prompt": "only"}\n')
    with pytest.raises(DataFormatError, match="line 2"):
        train_expert_from_file(settings, backbone, sessions, "hr", bad)
    with sessions() as session:
        assert repo.list_experts(session) == []
    train_expert_from_file(
        settings, backbone, sessions, "finance", domain_data["finance"], config=TrainConfig(epochs=1, max_steps=1)
    )
    with pytest.raises(ConflictError):
        train_expert_from_file(settings, backbone, sessions, "finance", domain_data["finance"])


def test_response_only_head_matches_full_logits(backbone):
    """The loss with the LM head on scored positions only equals the loss over full logits."""
    import torch

    from experts.data import ChatExample, tokenize_example
    from experts.training import batch_nll, collate

    examples = [tokenize_example(backbone.tokenizer, ChatExample((
        {"role": "user", "content": q}, {"role": "assistant", "content": a})), 128)
        for q, a in [("hi there", "hello, how can I help"), ("order late", "sorry, we will check it now")]]
    batch = collate(examples, backbone.tokenizer.pad_token_id, torch.device("cpu"))
    loss, count = batch_nll(backbone.model, batch)
    logits = backbone.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch.labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    assert count == int((batch.labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-4)


def test_reported_loss_is_the_saved_adapters_loss(settings, backbone, domain_data, tmp_path):
    """The held-out loss after training is taken from the kept epoch's score rather than a second full pass;
    scoring the saved adapter afresh must give the same figure (best epoch kept, or the last one)."""
    from peft import PeftModel

    from experts.data import load_examples, tokenize_example
    from experts.seed import split_examples
    from experts.training import mean_nll
    from pipelines.tracking import mlflow_run
    from pipelines.train_expert import train_adapter

    train, val = split_examples(load_examples(domain_data["medical"]))
    for keep_best in (True, False):
        config = TrainConfig(epochs=3, batch_size=4, learning_rate=3e-3, keep_best_epoch=keep_best)
        with mlflow_run(settings, run_name=f"reuse-{keep_best}"):
            result = train_adapter(settings, backbone, "medical", train, val, tmp_path / str(keep_best), config)
        val_tok = [tokenize_example(backbone.tokenizer, e, config.max_length) for e in val]
        model = PeftModel.from_pretrained(backbone.model, str(tmp_path / str(keep_best)))
        try:
            fresh = mean_nll(model, [t for t in val_tok if t is not None], backbone.tokenizer.pad_token_id)
        finally:
            backbone.model = model.unload()
        assert result.expert_loss == pytest.approx(fresh, rel=1e-5)
        assert result.expert_loss < result.base_loss


def test_default_recipes_are_the_shipped_adapters_recipes():
    """`python -m pipelines.train_default_experts` must reproduce what ships: each domain's recipe is the one
    recorded beside its adapter."""
    from experts.seed import DEFAULT_ADAPTERS_DIR, DEFAULT_DOMAINS
    from pipelines.train_default_experts import DEFAULT_RECIPES

    shipped = json.loads((DEFAULT_ADAPTERS_DIR / "metrics.json").read_text())
    assert set(DEFAULT_RECIPES) == set(DEFAULT_DOMAINS) == set(shipped)
    for domain, recipe in DEFAULT_RECIPES.items():
        assert {key: shipped[domain][key] for key in recipe} == recipe, domain
        # every shipped expert beats the bare backbone on its own held-out split (quality on other sources'
        # text is bench/quality.py's figure)
        assert shipped[domain]["reduction"] > 0, domain


def test_expert_add_warns_when_the_expert_is_worse_than_the_backbone(settings, monkeypatch, capsys, tmp_path):
    """`moe expert add` says so, on stderr, when the new expert makes held-out answers less likely than the bare
    backbone; a better expert gets no warning."""
    from cli import main as cli
    from pipelines import train_expert
    from pipelines.train_expert import ExpertTrainingResult

    outcome = {}

    def fake_train(*args, **kwargs):  # the boundary: training itself is tested above
        return ExpertTrainingResult("hr", 1, str(tmp_path), base_loss=2.0, expert_loss=outcome["loss"], steps=3,
                                    seconds=1.0, run_id="r", n_train=10, n_val=2)

    monkeypatch.setattr(train_expert, "train_expert_from_file", fake_train)
    monkeypatch.setattr(cli.Context, "backbone", None)
    monkeypatch.setenv("MOE_HOME", str(settings.home))
    data = tmp_path / "hr.jsonl"
    data.write_text("".join(f'{{"prompt": "how many leave days do I have ({i})", "response": "Check the HR portal."}}\n'
                            for i in range(4)))  # the fewest records `expert add` accepts
    for loss, warned in ((2.2, True), (1.5, False)):
        outcome["loss"] = loss
        assert cli.main(["expert", "add", "hr", "--data", str(data), "--no-router"]) == 0
        err = capsys.readouterr().err
        assert ("warning: expert hr is not better than the bare backbone" in err) is warned
